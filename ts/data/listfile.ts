/**
 * VTAB-1k style list files: one `<path> <label>` per line.
 *
 * @module
 */
import * as fs from 'node:fs';
import { SnellaError } from '../errors';

/** One parsed line of a list file. */
export interface ListEntry {
  /** Image path as written (relative to the data set root). */
  path: string;
  /** Class index, integer ≥ 0. */
  label: number;
  /** 1-based line number in the list file, for messages. */
  line: number;
}

const LINE_RE = /^(.*\S)\s+(\d+)$/;

/**
 * Parses the text of a list file.
 *
 * Each non-blank line is `<path> <label>`: the label is the last
 * whitespace-separated field, a decimal integer ≥ 0; everything before it
 * (trimmed) is the path, which may contain spaces. Blank lines are skipped;
 * `\r\n` line ends and a UTF-8 BOM are accepted.
 *
 * @param text - the file content.
 * @param fileName - used in error messages.
 * @returns the entries in file order.
 * @throws Error `"<fileName>:<line>: ..."` for a line that does not parse or a
 *   label above 2^31 − 1.
 */
export function parseListText(text: string, fileName: string): ListEntry[] {
  const out: ListEntry[] = [];
  const lines = text.replace(/^\uFEFF/, '').split(/\r?\n/);
  for (let i = 0; i < lines.length; i++) {
    const raw = lines[i].trim();
    if (raw === '') continue;
    const m = LINE_RE.exec(raw);
    if (!m) {
      throw new SnellaError('DATA', 
        `${fileName}:${i + 1}: expected "<image path> <integer label>", got ${JSON.stringify(lines[i].slice(0, 200))}`,
      );
    }
    const label = Number(m[2]);
    if (!Number.isSafeInteger(label) || label > 0x7fffffff) {
      throw new SnellaError('DATA', `${fileName}:${i + 1}: label ${m[2]} is out of range (0..2147483647)`);
    }
    out.push({ path: m[1], label, line: i + 1 });
  }
  return out;
}

/**
 * Reads and parses a list file (see {@link parseListText}).
 *
 * @param file - path of the list file.
 * @throws Error `"list file not found: <file>"` if it does not exist, or the
 *   errors of {@link parseListText}.
 */
export async function readListFile(file: string): Promise<ListEntry[]> {
  let text: string;
  try {
    text = await fs.promises.readFile(file, 'utf8');
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    if (err.code === 'ENOENT') throw new SnellaError('DATA', `list file not found: ${file}`);
    throw new SnellaError('DATA', `cannot read list file ${file} (${err.message})`);
  }
  return parseListText(text, file);
}
