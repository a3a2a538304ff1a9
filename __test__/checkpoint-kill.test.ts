import test from 'ava';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { CHECKPOINT_FILE, VitModel } from '../ts';
import { VIT_TINY, tmpDir } from './helpers/tiny';

const SAVER = path.join(__dirname, 'fixtures/checkpoint/saver.ts');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// (c) A child process saves large checkpoints (full fine-tuning of ViT-Tiny: ~66 MB each) in a loop
// and is SIGKILLed several times, at random moments and while a temporary file is being written: the folder must always hold a complete
// checkpoint, the last one the child reported or the one it was finishing.
test('SIGKILL during checkpoint saves never leaves a broken checkpoint', async (t) => {
  t.timeout(600_000);
  const dir = tmpDir('snella-kill-');
  let kills = 0;
  let midWrite = 0;
  for (let attempt = 0; attempt < 30 && (kills < 6 || midWrite < 2); attempt++) {
    const child = spawn(process.execPath, ['--import=tsx', SAVER, dir, VIT_TINY], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stderr.on('data', (d) => (err += d));
    let last = -1;
    let ms = 0;
    const first = new Promise<void>((resolve, reject) => {
      child.stdout.on('data', (d) => {
        out += d;
        const all = [...out.matchAll(/saved (\d+) (\d+)\n/g)];
        if (all.length) {
          last = Number(all.at(-1)![1]);
          ms = Math.max(ms, Number(all.at(-1)![2]));
          resolve();
        }
      });
      child.once('exit', (code) => reject(new Error(`saver exited (${code}) before its first save: ${err}`)));
    });
    await first;
    if (attempt % 2 === 0) {
      // Let a few saves complete, then kill at a random moment of one.
      await sleep(ms * (1 + 3 * Math.random()));
      child.kill('SIGKILL');
    } else {
      // Kill as soon as a temporary file appears: while the bytes are being written.
      await new Promise<void>((resolve) => {
        const w = fs.watch(dir, (_, f) => {
          if (f && String(f) === `.${CHECKPOINT_FILE}.tmp-${child.pid}`) {
            child.kill('SIGKILL');
            w.close();
            resolve();
          }
        });
      });
    }
    await once(child, 'exit');
    kills++;
    const temps = fs.readdirSync(dir).filter((f) => f.startsWith(`.${CHECKPOINT_FILE}.tmp-`));
    if (temps.length) midWrite++;
    const m = VitModel.load(VIT_TINY, { device: 'cpu' });
    const info = m.loadCheckpoint(dir); // throws on a truncated or inconsistent file
    m.dispose();
    const i = (info.extra as { i: number }).i;
    t.true(i === last || i === last + 1, `kill ${kills}: checkpoint holds save ${i}; the child had reported ${last}`);
  }
  t.log(`${kills} kills, ${midWrite} of them during a write (a temporary file was left; the checkpoint still loaded)`);
  t.true(kills >= 6);
  t.true(midWrite >= 1, 'at least one kill hit a save mid-write');
  fs.rmSync(dir, { recursive: true, force: true });
});
