import test from 'ava';
import { execFileSync } from 'node:child_process';
import * as path from 'node:path';
import { ROOT, tmpDir } from './helpers/tiny';

const run = (args: string[]) =>
  execFileSync(process.execPath, ['--import=tsx', path.join(ROOT, 'examples/resume.ts'), '--device', 'cpu', '--epochs', '2', '--batch', '120', ...args], {
    cwd: ROOT,
    encoding: 'utf8',
  });

test('examples/resume.ts: stopped after 1 step and resumed, it ends like an uninterrupted run', (t) => {
  const straight = run(['--out', tmpDir()]);
  const dir = tmpDir();
  const first = run(['--out', dir, '--stop-after', '1']);
  t.regex(first, /stopped after step 1; continue with --resume/);
  const second = run(['--out', dir, '--resume']);
  t.regex(second, /finished \(resumed at step 1\): 3 steps in this call/);
  const last = (s: string) => s.trim().split('\n').at(-1);
  t.is(last(second), last(straight), 'same final parameters');
});
