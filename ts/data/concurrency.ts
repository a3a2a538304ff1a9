/**
 * Bounded-concurrency helpers for async work.
 *
 * @module
 */

/**
 * Runs `fn` on every item, starting them in index order with at most
 * `limit` calls in flight; `fn` stores its own results.
 *
 * After the first rejection no new call is started and the returned promise
 * rejects with that error once the calls already in flight have settled
 * (their own errors are dropped), so no work outlives the call.
 *
 * @param items - inputs, processed in index order.
 * @param limit - maximum number of concurrent calls, integer ≥ 1.
 * @param fn - async worker, given the item and its index.
 * @throws RangeError if `limit` is not an integer ≥ 1; otherwise the first
 *   error thrown by `fn`.
 */
export async function forEachLimit<T>(
  items: readonly T[],
  limit: number,
  fn: (item: T, index: number) => Promise<void>,
): Promise<void> {
  if (!Number.isInteger(limit) || limit < 1) {
    throw new RangeError(`concurrency limit must be an integer >= 1, got ${limit}`);
  }
  let next = 0;
  let failed = false;
  let firstError: unknown;
  const worker = async (): Promise<void> => {
    while (!failed && next < items.length) {
      const i = next++;
      try {
        await fn(items[i], i);
      } catch (e) {
        if (!failed) {
          failed = true;
          firstError = e;
        }
      }
    }
  };
  const workers: Promise<void>[] = [];
  for (let w = 0; w < Math.min(limit, items.length); w++) workers.push(worker());
  await Promise.all(workers);
  if (failed) throw firstError;
}
