import test from 'ava';
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';

const ROOT = path.resolve(__dirname, '..');

// Builds both npm tarballs, installs them into an empty folder with cargo/rustc/nvcc off PATH and
// runs a tiny real job with the installed package (scripts/pack-test.sh). About 15–60 s.
test('npm pack: root + platform tarballs install without a toolchain and run a job', (t) => {
  const r = spawnSync('bash', [path.join(ROOT, 'scripts/pack-test.sh')], {
    cwd: ROOT,
    encoding: 'utf8',
    timeout: 4 * 60_000,
  });
  const out = `${r.stdout}\n${r.stderr}`;
  t.log(out.trim().split('\n').slice(-12).join('\n'));
  t.is(r.status, 0, out);
  t.regex(r.stdout, /PACK TEST OK/);
  t.regex(r.stdout, /addon from node_modules\/@snella\/snella-linux-x64-gnu\/snella\.linux-x64-gnu\.node/);
  t.regex(r.stdout, /predicted \(random head\): [^,]+, [^,]+/);
});
