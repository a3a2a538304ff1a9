import test from 'ava';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { CHECKPOINT_FILE, VitModel } from '../ts';
import { cli, smallData } from './helpers/cli';
import { VIT_TINY, tmpDir } from './helpers/tiny';

// (2) The CLI: Ctrl-C (SIGINT) stops at a step boundary and leaves a checkpoint in OUT/checkpoint;
// `--resume` continues it; the final adapter and checkpoint equal an uninterrupted run's byte for byte.
test('snella train: SIGINT saves a checkpoint, --resume finishes bit-identical to an uninterrupted run', async (t) => {
  t.timeout(600_000);
  const data = smallData();
  const base = ['--model', VIT_TINY, '--data', data, '--train-split', 'train', '--test-split', 'test', '--method', 'snella',
    '--epochs', '3', '--batch', '8', '--lr', '2e-3', '--warmup', '1', '--seed', '4', '--device', 'cpu', '--json'];
  const outA = tmpDir('snella-cli-a-');
  const outB = tmpDir('snella-cli-b-');

  const a = await cli([...base, '--out', outA]);
  t.is(a.code, 0, a.err);

  const ckptB = path.join(outB, 'checkpoint', CHECKPOINT_FILE);
  const b = await cli([...base, '--out', outB], (interrupt) => {
    const poll = setInterval(() => {
      if (fs.existsSync(ckptB)) { // saved at the end of epoch 0 (step 3): interrupt during epoch 1
        clearInterval(poll);
        interrupt();
      }
    }, 20);
  });
  t.is(b.code, 130, `exit code 130 after SIGINT\n${b.err}`);
  t.regex(b.err, /interrupt: stopping at the next step boundary/);
  const m = VitModel.load(VIT_TINY, { device: 'cpu' });
  const info = m.loadCheckpoint(path.join(outB, 'checkpoint'));
  m.dispose();
  t.false(info.resume.finished, `stopped early, at step ${info.resume.step}`);
  t.true(info.resume.step >= 3 && info.resume.step < 9, `step ${info.resume.step}`);

  // Without --resume (and without --overwrite) nothing of the interrupted run is replaced.
  const refused = await cli([...base, '--out', outB, '--checkpoint-dir', path.join(outB, 'checkpoint')]);
  t.not(refused.code, 0);
  t.regex(refused.out + refused.err, /already there/);

  const c = await cli([...base, '--out', outB, '--resume']);
  t.is(c.code, 0, c.err);
  const result = JSON.parse(c.out.trim().split('\n').at(-1)!) as { epochs: { epoch: number }[] };
  t.is(result.epochs.at(-1)?.epoch, 2);
  for (const f of ['adapter/adapter_model.safetensors', `checkpoint/${CHECKPOINT_FILE}`]) {
    t.true(fs.readFileSync(path.join(outA, f)).equals(fs.readFileSync(path.join(outB, f))), `${f} is byte-identical`);
  }
  for (const d of [data, outA, outB]) fs.rmSync(d, { recursive: true, force: true });
});
