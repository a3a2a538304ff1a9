#!/usr/bin/env node
/**
 * The `snella` command line: `snella demo` and `snella train`.
 * @module
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { SnellaError } from '../errors';
import { runJob, type JobOptions } from './job';

/** Exit codes: 0 success, 1 failure, 2 bad usage, 130 interrupted. */
export const EXIT = { ok: 0, failure: 1, usage: 2, interrupted: 130 } as const;

const ASSETS = path.resolve(__dirname, '../../assets');

function num(name: string, lo: number, hi: number, int = false) {
  return (v: string): number => {
    const x = Number(v);
    if (!Number.isFinite(x) || x < lo || x > hi || (int && !Number.isInteger(x))) {
      throw new InvalidArgumentError(`--${name} must be ${int ? 'an integer' : 'a number'} in [${lo}, ${hi}]`);
    }
    return x;
  };
}

function withRecipe(c: Command, d: Partial<JobOptions>): Command {
  return c
    .addOption(new Option('--method <m>', 'fine-tuning method').choices(['snella', 'snell', 'lora', 'linear', 'full']).default(d.method ?? 'snella'))
    .option('--rank <r>', 'rank r of SNELLA/SNELL/LoRA', num('rank', 1, 4096, true), d.rank ?? 8)
    .option('--heads <h>', 'kernel pieces H (spec §1)', num('heads', 1, 64, true), 2)
    .option('--s0 <s>', 'initial sparsity (fraction zeroed)', num('s0', 0, 0.999999), d.s0 ?? 0.01)
    .option('--sT <s>', 'target sparsity (fraction zeroed)', num('sT', 0, 0.999999), d.sT ?? 0.5)
    .option('--beta1 <b>', 'allocator importance EMA β1', num('beta1', 0, 0.999999), 0.85)
    .option('--beta2 <b>', 'allocator uncertainty EMA β2', num('beta2', 0, 0.999999), 0.85)
    .option('--epochs <n>', 'epochs', num('epochs', 1, 100000, true), d.epochs ?? 40)
    .option('--batch <n>', 'batch size', num('batch', 1, 65536, true), d.batch ?? 64)
    .option('--lr <x>', 'peak learning rate', num('lr', 1e-12, 10), d.lr ?? 1e-3)
    .option('--wd <x>', 'AdamW weight decay', num('wd', 0, 10), 0.05)
    .option('--warmup <n>', 'warm-up epochs', num('warmup', 0, 100000, true), d.warmup ?? 4)
    .option('--seed <n>', 'seed of init and batch order', num('seed', 0, 2 ** 32 - 1, true), 0)
    .option('--recompute', 'recompute block activations in backward (activation checkpointing: less memory)', false)
    .option('--micro-batches <n>', 'gradient accumulation: run each batch as N micro-batches (the same update, less activation memory)', num('micro-batches', 1, 65536, true), 1)
    .option('--gpus <n>', 'data-parallel training on CUDA GPUs 0..N-1 of this machine through NCCL (--batch stays the global batch)', num('gpus', 1, 1024, true))
    .option('--rendezvous <host:port>', 'multi-process data-parallel training: where rank 0 listens (with --world-rank and --world)')
    .option('--world-rank <r>', 'this process\'s rank in the multi-process group, 0..world-1', num('world-rank', 0, 65535, true))
    .option('--world <w>', 'the number of processes in the multi-process group', num('world', 1, 65536, true))
    .option('--rendezvous-timeout <s>', 'seconds to wait for every rank of the multi-process group (default 600)', num('rendezvous-timeout', 0.001, 86400))
    .option('--train-split <name>', 'training list file (without .txt) or subfolder', d.trainSplit ?? 'train800val200')
    .option('--test-split <name>', 'test list file or subfolder', d.testSplit ?? 'test')
    .option('--test-data <dir>', 'a separate test folder (ImageFolder data)')
    .option('--out <dir>', 'output folder (adapter, results.json)', d.out ?? 'runs/latest')
    .option('--overwrite', 'replace an adapter (and a training checkpoint) already in --out', d.overwrite ?? false)
    .option('--checkpoint-dir <dir>', 'training checkpoint folder, saved each epoch and on Ctrl-C (default: OUT/checkpoint)')
    .option('--resume', 'continue from the checkpoint in --checkpoint-dir (same options as the interrupted run)', false)
    .option('--report <dir>', 'write a self-contained HTML training report (DIR/report.html, DIR/history.json)')
    .option('--eval-every-epoch', 'evaluate the test set after every epoch (default: on with --report)')
    .option('--no-eval-every-epoch', 'no test evaluation after every epoch, only at the end')
    .addOption(new Option('--device <d>', 'compute device').choices(['auto', 'cpu', 'cuda']).default('auto'))
    .addOption(new Option('--precision <p>', 'GEMM precision on CUDA (bf16: bf16 operands, f32 accumulation)').choices(['f32', 'tf32', 'bf16']).default('f32'))
    .option('--json', 'print one JSON result line, no progress bar', false);
}

/** The CLI flag of each training option that errors name by its API field. */
const FLAGS: Record<string, string> = {
  microBatches: '--micro-batches',
  batchSize: '--batch',
  epochs: '--epochs',
  lr: '--lr',
  weightDecay: '--wd',
  warmupEpochs: '--warmup',
  sT: '--sT',
  seed: '--seed',
  'distributed.rank': '--world-rank',
  'distributed.world': '--world',
  'distributed.rendezvous': '--rendezvous',
  'distributed.timeoutSeconds': '--rendezvous-timeout',
};

async function run(o: JobOptions): Promise<number> {
  const ac = new AbortController();
  const onInt = () => {
    if (ac.signal.aborted) process.exit(EXIT.interrupted);
    process.stderr.write('\ninterrupt: stopping at the next step boundary (Ctrl-C again to quit now)\n');
    ac.abort();
  };
  process.on('SIGINT', onInt);
  try {
    const r = await runJob(o, ac.signal);
    return ac.signal.aborted ? EXIT.interrupted : r ? EXIT.ok : EXIT.failure;
  } catch (e) {
    const text = e instanceof SnellaError ? e.message : '';
    const flag = e instanceof SnellaError && e.code === 'CONFIG' ? FLAGS[/invalid config: ([\w.]+) =/.exec(text)?.[1] ?? ''] : undefined;
    const msg = e instanceof SnellaError ? `error [${e.code}]: ${text}${flag ? ` (option ${flag})` : ''}` : `error: ${(e as Error).stack ?? e}`;
    if (o.json) process.stdout.write(JSON.stringify({ error: msg, code: e instanceof SnellaError ? e.code : 'INTERNAL' }) + '\n');
    process.stderr.write(msg + '\n');
    return e instanceof SnellaError && e.code === 'CONFIG' ? EXIT.usage : EXIT.failure;
  } finally {
    process.off('SIGINT', onInt);
  }
}

/** Builds the command tree (exported for tests). */
export function program(): Command {
  // exitOverride: commander throws instead of exiting, so that its usage errors (unknown or missing
  // option, a bad value) end with EXIT.usage like the configuration errors (subcommands inherit it)
  const p = new Command('snella').description('SNELLA sparse fine-tuning of Vision Transformers').showHelpAfterError('(add --help for the options)').exitOverride();
  withRecipe(
    p.command('train').description('fine-tune a ViT checkpoint on an image dataset (defaults: the reference recipe, spec §8)'),
    {},
  )
    .requiredOption('--model <file>', 'timm-named ViT safetensors checkpoint')
    .requiredOption('--data <dir>', 'data folder: VTAB-1k list files + images.tar, or ImageFolder class subfolders')
    .action(async (o) => {
      process.exitCode = await run(o as JobOptions);
    });
  withRecipe(
    p.command('demo').description('a short SNELLA run of the bundled ViT-Tiny on a bundled 10-class Flowers-102 subset (a re-run replaces what an earlier one wrote to --out)'),
    { epochs: 10, batch: 32, lr: 2e-3, warmup: 1, sT: 0.5, trainSplit: 'train', testSplit: 'test', out: 'runs/demo', overwrite: true },
  )
    .option('--model <file>', 'checkpoint', path.join(ASSETS, 'models/vit_tiny_patch8_64.safetensors'))
    .option('--data <dir>', 'data folder', path.join(ASSETS, 'flowers10-64'))
    .action(async (o) => {
      const model = (o as JobOptions).model;
      if (!fs.existsSync(model)) {
        // The npm package leaves out assets/ (the 21 MB demo model): the demo needs a git checkout.
        process.stderr.write(
          `error: the demo model ${model} is not there: the npm package does not ship assets/; ` +
            'run the demo from a git checkout of snella, or pass --model and --data\n',
        );
        process.exitCode = EXIT.failure;
        return;
      }
      process.exitCode = await run(o as JobOptions);
    });
  return p;
}

if (require.main === module) {
  program()
    .parseAsync(process.argv)
    .catch((e) => {
      if (e instanceof CommanderError) {
        // commander has printed the message (or the help/version: exit code 0)
        process.exitCode = e.exitCode === 0 ? EXIT.ok : EXIT.usage;
        return;
      }
      process.stderr.write(`error: ${(e as Error).message}\n`);
      process.exitCode = EXIT.usage;
    });
}
