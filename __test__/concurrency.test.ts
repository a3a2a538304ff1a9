import test from 'ava';
import { VitModel, train } from '../ts';
import { TINY, randomSource } from './helpers/tiny';

/** Trains a fresh SNELLA model on the tiny ViT and returns its adapter and head values. */
async function run(seed: number): Promise<Float32Array[]> {
  const m = VitModel.load(TINY, { device: 'cpu' });
  m.attach({ method: 'snella', numClasses: 5, rank: 4, s0: 0.3, seed });
  await train(m, { train: randomSource(48, { seed }), epochs: 3, batchSize: 8, warmupEpochs: 1, sT: 0.5, seed });
  const names = ['blocks.0.attn.q.snella_A', 'blocks.1.mlp.fc2.snella_B', 'blocks.1.attn.proj.snella_mix', 'head.weight', 'cls_token'];
  const out = names.map((n) => m.tensor(n).data);
  m.dispose();
  return out;
}

test('two models training at once in one process give the same results as each alone', async (t) => {
  const alone = [await run(1), await run(2)];
  const together = await Promise.all([run(1), run(2)]);
  for (let k = 0; k < 2; k++) {
    together[k].forEach((v, i) => t.deepEqual(Array.from(v), Array.from(alone[k][i])));
  }
  t.notDeepEqual(Array.from(alone[0][0]), Array.from(alone[1][0]), 'different seeds train different models');
});
