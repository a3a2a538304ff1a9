/**
 * Errors thrown by snella. Native failures arrive as `[CODE] message` and become
 * {@link SnellaError} with `code` set.
 * @module
 */

/**
 * Stable error codes (match on these, not on messages):
 *
 * - `CONFIG`: an option out of range; the message names the field, value and allowed range.
 * - `TENSOR`: a tensor with the wrong shape/dtype or an unknown name (names file and tensor).
 * - `FILE`: a file that cannot be read, parsed or written, or would be overwritten (names it).
 * - `TARGET`: an adapter target matching no layer (lists the real layer names).
 * - `NON_FINITE`: NaN/Inf in the loss or a gradient (names the first tensor).
 * - `CUDA_UNAVAILABLE`: `device: 'cuda'` asked for but unusable (says why: no driver, no GPU, …),
 *   or NCCL (`libnccl.so.2`) missing for data-parallel training on GPUs (names the paths tried).
 * - `COMM_ERROR`: data-parallel training failed between ranks: the rendezvous timed out (names the
 *   address and the missing ranks), a rank left, or the ranks disagree (state, buffer sizes).
 * - `ABORTED`: an operation cancelled.
 * - `DISPOSED`: a call on a disposed model.
 * - `DATA`: a malformed data file (e.g. a {@link TensorDataset} file).
 * - `NATIVE_LOAD`: the native addon cannot be loaded (names the platform and each path tried).
 * - `STATE`: the native model is unusable after an earlier panic; dispose it.
 *
 * Other strings may be added in later releases.
 */
export type SnellaErrorCode =
  | 'CONFIG'
  | 'TENSOR'
  | 'FILE'
  | 'TARGET'
  | 'NON_FINITE'
  | 'CUDA_UNAVAILABLE'
  | 'COMM_ERROR'
  | 'ABORTED'
  | 'DISPOSED'
  | 'DATA'
  | 'NATIVE_LOAD'
  | 'STATE'
  | string;

/** An error from snella with a stable {@link SnellaErrorCode}. */
export class SnellaError extends Error {
  /** The stable code, e.g. `CONFIG` for an option out of range, `FILE` for a bad file. */
  readonly code: SnellaErrorCode;
  /**
   * An error with a stable code.
   * @param code - the stable code.
   * @param message - what is wrong, naming the field, file or tensor at fault.
   * @param options - `cause`: the underlying error (e.g. the native one).
   */
  constructor(code: SnellaErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'SnellaError';
    this.code = code;
  }
}

/**
 * Converts an error thrown by the native addon (message `[CODE] text`) into a {@link SnellaError}
 * with `code` CODE, message `text` and the original as `cause`; other values are returned unchanged.
 * @param e - a caught value.
 */
export function fromNative(e: unknown): unknown {
  if (e instanceof Error) {
    const m = /^\[([A-Z_]+)\] ([\s\S]*)$/.exec(e.message);
    // device and communication errors also start their text with the code: keep it once, in `code`
    if (m) return new SnellaError(m[1], m[2].startsWith(`${m[1]}: `) ? m[2].slice(m[1].length + 2) : m[2], { cause: e });
  }
  return e;
}

/** Runs `f`, converting native errors (see {@link fromNative}). */
export function native<T>(f: () => T): T {
  try {
    return f();
  } catch (e) {
    throw fromNative(e);
  }
}

/** Awaits `p`, converting native errors (see {@link fromNative}). */
export async function nativeAsync<T>(p: () => Promise<T>): Promise<T> {
  try {
    return await p();
  } catch (e) {
    throw fromNative(e);
  }
}
