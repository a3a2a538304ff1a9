/** Shared helpers of the CLI tests: a small copy of the bundled flowers and a CLI runner. */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { FLOWERS, ROOT, tmpDir } from './tiny';

/** The CLI entry point, run through tsx (no build needed). */
export const CLI = path.join(ROOT, 'ts/cli/main.ts');

/** A 24-image training and 13–14-image test subset of the bundled flowers (every 10th line). */
export function smallData(): string {
  const d = tmpDir('snella-cli-data-');
  fs.symlinkSync(path.join(FLOWERS, 'images.tar'), path.join(d, 'images.tar'));
  fs.copyFileSync(path.join(FLOWERS, 'classes.json'), path.join(d, 'classes.json'));
  for (const split of ['train', 'test']) {
    const lines = fs.readFileSync(path.join(FLOWERS, `${split}.txt`), 'utf8').split('\n').filter(Boolean);
    fs.writeFileSync(path.join(d, `${split}.txt`), lines.filter((_, i) => i % 10 === 0).join('\n') + '\n');
  }
  return d;
}

/** Runs `snella train ARGS`; `onSpawn` receives a function that sends the process SIGINT. */
export function cli(args: string[], onSpawn?: (kill: () => void) => void): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, ['--import=tsx', CLI, 'train', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (err += d));
    onSpawn?.(() => p.kill('SIGINT'));
    p.on('exit', (code) => resolve({ code, out, err }));
  });
}
