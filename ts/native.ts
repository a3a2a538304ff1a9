/**
 * Loads the native addon, with an error that says why when it cannot be loaded.
 * @module
 */
import type * as Binding from '../native/binding';
import { SnellaError } from './errors';

let cached: typeof Binding | undefined;

/**
 * The raw napi binding. Loaded on first use.
 * @throws {@link SnellaError} with code `NATIVE_LOAD` naming the platform triple and the loader's
 *   message when the binary for this platform is missing or cannot be opened.
 */
export function binding(): typeof Binding {
  if (cached) return cached;
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    cached = require('../native/binding.js') as typeof Binding;
    return cached;
  } catch (e) {
    const triple = `${process.platform}-${process.arch}`;
    throw new SnellaError(
      'NATIVE_LOAD',
      `cannot load the snella native addon for ${triple}: ${(e as Error).message}`,
      { cause: e },
    );
  }
}
