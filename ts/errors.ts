/**
 * Errors thrown by snella. Native failures arrive as `[CODE] message` and become
 * {@link SnellaError} with `code` set.
 * @module
 */

/** Stable error codes. */
export type SnellaErrorCode =
  | 'CONFIG'
  | 'TENSOR'
  | 'FILE'
  | 'TARGET'
  | 'NON_FINITE'
  | 'CUDA_UNAVAILABLE'
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
  constructor(code: SnellaErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'SnellaError';
    this.code = code;
  }
}

/**
 * Converts an error thrown by the native addon (`[CODE] text`) into a {@link SnellaError};
 * other values are returned unchanged.
 */
export function fromNative(e: unknown): unknown {
  if (e instanceof Error) {
    const m = /^\[([A-Z_]+)\] ([\s\S]*)$/.exec(e.message);
    if (m) return new SnellaError(m[1], m[2], { cause: e });
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
