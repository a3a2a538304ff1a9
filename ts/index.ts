/**
 * snella: SNELLA sparse fine-tuning of pre-trained Vision Transformers from TypeScript.
 *
 * @example
 * ```ts
 * import { VitModel, ImageDataset, train, evaluate } from 'snella';
 * const model = VitModel.load('vit_tiny_patch8_64.safetensors');
 * const cfg = model.config;
 * const ds = await ImageDataset.open('data/flowers', 'train800val200', { imageSize: cfg.img_size,
 *   normalization: { mean: cfg.mean, std: cfg.std } });
 * model.attach({ method: 'snella', numClasses: ds.numClasses, rank: 8 });
 * await train(model, { train: ds, epochs: 40, sT: 0.5 });
 * model.saveAdapter('out/adapter');
 * ```
 * @module
 */
export * from './errors';
export * from './model';
export * from './train';
export * from './data';
export { CHECKPOINT_FILE, checkpointExists, type CheckpointInfo, type ResumePoint } from './checkpoint';
export * from './resources';
export * from './report';
export * from './io';
