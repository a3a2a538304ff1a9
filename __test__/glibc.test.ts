import test from 'ava';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

const ROOT = path.resolve(__dirname, '..');
const NATIVE = path.join(ROOT, 'native');

/**
 * The documented floor (README, "Platform support"): the highest GLIBC_ symbol version the
 * linux-x64-gnu addon may require. Raising it drops older distributions: update README and this.
 */
const GLIBC_FLOOR = '2.34';

function cmp(a: string, b: string): number {
  const x = a.split('.').map(Number);
  const y = b.split('.').map(Number);
  for (let i = 0; i < Math.max(x.length, y.length); i++) {
    const d = (x[i] ?? 0) - (y[i] ?? 0);
    if (d) return d;
  }
  return 0;
}

/** GLIBC_x.y versions the addon needs: `objdump -T` when present, else the strings of the file. */
function glibcVersions(file: string): string[] {
  const r = spawnSync('objdump', ['-T', file], { encoding: 'utf8', maxBuffer: 64 << 20 });
  const text = r.status === 0 ? r.stdout : fs.readFileSync(file).toString('latin1');
  return [...new Set([...text.matchAll(/GLIBC_(\d+(?:\.\d+)+)/g)].map((m) => m[1]))].sort(cmp);
}

test(`the linux-x64-gnu addon needs at most GLIBC_${GLIBC_FLOOR} (README floor)`, (t) => {
  const file = path.join(NATIVE, 'snella.linux-x64-gnu.node');
  if (!fs.existsSync(file)) {
    t.fail(`${file} is missing: npm run build:native`);
    return;
  }
  const versions = glibcVersions(file);
  t.true(versions.length > 0, 'no GLIBC_ version found: not a glibc build?');
  const highest = versions.at(-1)!;
  t.log(`highest GLIBC_ needed: ${highest} (floor ${GLIBC_FLOOR})`);
  t.true(
    cmp(highest, GLIBC_FLOOR) <= 0,
    `the addon now needs GLIBC_${highest} > the documented floor GLIBC_${GLIBC_FLOOR}: ` +
      'build on an older glibc (e.g. napi build --use-napi-cross / a manylinux-like image) or raise the floor in README and here',
  );
});

test('the README states the same floor', (t) => {
  t.true(fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8').includes(`GLIBC_${GLIBC_FLOOR}`));
});
