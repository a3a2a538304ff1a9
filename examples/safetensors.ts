/**
 * A minimal safetensors writer and header reader for the examples (no npm dependency: none is
 * maintained for Node). Format (https://github.com/huggingface/safetensors): an 8-byte little-endian
 * unsigned header length N, then N bytes of UTF-8 JSON
 * `{ "__metadata__": { str: str }, "<name>": { "dtype": "F32", "shape": [...], "data_offsets": [begin, end] } }`
 * (padded with spaces so the data starts 8-byte aligned), then the raw tensor bytes, offsets
 * relative to the start of the data. Tensors are written in name order, F32 little-endian.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';

/** One tensor to write: shape (outermost first) and float32 row-major values. */
export interface F32Tensor {
  shape: number[];
  data: Float32Array;
}

/**
 * Writes `tensors` as F32 to `file`, atomically (a temporary file, then a rename).
 * @throws Error when a tensor's length does not match its shape, or on I/O failure.
 */
export function writeSafetensors(file: string, tensors: Record<string, F32Tensor>, metadata: Record<string, string> = {}): void {
  if (os.endianness() !== 'LE') throw new Error('writeSafetensors: big-endian hosts are not supported');
  const names = Object.keys(tensors).sort();
  const header: Record<string, unknown> = { __metadata__: metadata };
  let offset = 0;
  for (const name of names) {
    const t = tensors[name];
    const count = t.shape.reduce((p, d) => p * d, 1);
    if (count !== t.data.length) throw new Error(`tensor ${name}: shape [${t.shape}] holds ${count} values, got ${t.data.length}`);
    header[name] = { dtype: 'F32', shape: t.shape, data_offsets: [offset, offset + t.data.byteLength] };
    offset += t.data.byteLength;
  }
  let json = Buffer.from(JSON.stringify(header), 'utf8');
  const pad = (8 - (json.length % 8)) % 8;
  if (pad) json = Buffer.concat([json, Buffer.alloc(pad, 0x20)]);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  const tmp = `${file}.tmp-${process.pid}`;
  const fd = fs.openSync(tmp, 'w');
  try {
    fs.writeSync(fd, len);
    fs.writeSync(fd, json);
    for (const name of names) {
      const d = tensors[name].data;
      fs.writeSync(fd, new Uint8Array(d.buffer, d.byteOffset, d.byteLength));
    }
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
}

/**
 * The header of a safetensors file: its metadata and each tensor's dtype and shape.
 * @throws Error naming the file when it is not a safetensors file.
 */
export function readSafetensorsHeader(file: string): {
  metadata: Record<string, string>;
  tensors: Record<string, { dtype: string; shape: number[] }>;
} {
  const fd = fs.openSync(file, 'r');
  try {
    const len = Buffer.alloc(8);
    if (fs.readSync(fd, len, 0, 8, 0) !== 8) throw new Error(`${file}: not a safetensors file (shorter than 8 bytes)`);
    const n = Number(len.readBigUInt64LE());
    if (n > 100 << 20 || n > fs.fstatSync(fd).size - 8) throw new Error(`${file}: not a safetensors file (header length ${n})`);
    const buf = Buffer.alloc(n);
    fs.readSync(fd, buf, 0, n, 8);
    const { __metadata__: metadata = {}, ...tensors } = JSON.parse(buf.toString('utf8'));
    return { metadata, tensors };
  } finally {
    fs.closeSync(fd);
  }
}
