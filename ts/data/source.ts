/**
 * Byte-level access to the files of an image data set: a plain folder
 * ({@link DirSource}) or an uncompressed `.tar` archive ({@link TarSource}).
 *
 * Paths handed to and returned by a source are always POSIX-style and
 * relative to the source root (`"001/image_06734.jpg"`), whatever the
 * platform.
 *
 * @module
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Header, Pax, type HeaderData } from 'tar';
import { SnellaError } from '../errors';

/**
 * Where the bytes of a data set's files come from.
 *
 * Implementations must be safe to call concurrently (several `read`s in
 * flight at once).
 */
export interface ImageSource {
  /** Absolute path of the folder or archive, for messages. */
  readonly location: string;
  /**
   * Whether `relPath` names a regular file of this source.
   * @param relPath - POSIX path relative to the source root.
   */
  has(relPath: string): Promise<boolean>;
  /**
   * The whole content of one file.
   * @param relPath - POSIX path relative to the source root.
   * @returns a fresh Buffer (the caller may keep or modify it).
   * @throws Error naming {@link ImageSource.describe}(relPath) if the file
   *   does not exist or cannot be read.
   */
  read(relPath: string): Promise<Buffer>;
  /**
   * Every regular file of the source, as POSIX paths relative to its root,
   * sorted by code unit. Hidden files and folders (name starting with `.`)
   * are left out.
   */
  list(): Promise<string[]>;
  /**
   * A human-readable name of one file for error messages: the file's path for
   * a folder, `<archive path>:<entry path>` for an archive.
   */
  describe(relPath: string): string;
}

/**
 * Normalises a relative path the way sources store it: backslashes become
 * slashes, a leading `./` or `/` is dropped, `a/./b` and `a/x/../b` collapse.
 *
 * @param p - a relative path as written in a list file or a tar header.
 * @returns the normalised POSIX path ("" for the root itself).
 */
export function normalizeRelPath(p: string): string {
  let s = p.replace(/\\/g, '/');
  s = path.posix.normalize(s);
  while (s.startsWith('./')) s = s.slice(2);
  while (s.startsWith('/')) s = s.slice(1);
  if (s === '.') s = '';
  if (s.endsWith('/')) s = s.slice(0, -1);
  return s;
}

function isHiddenPath(rel: string): boolean {
  return rel.split('/').some((part) => part.startsWith('.'));
}

function compareCodeUnits(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** Files under a folder on disk. */
export class DirSource implements ImageSource {
  /** Absolute path of the folder. */
  readonly location: string;

  /**
   * A source reading the files under `root`.
   * @param root - the folder; relative paths are resolved against the
   *   process's working directory. Existence is not checked here.
   */
  constructor(root: string) {
    this.location = path.resolve(root);
  }

  /** {@inheritDoc ImageSource.has} */
  async has(relPath: string): Promise<boolean> {
    try {
      const st = await fs.promises.stat(this.absolute(relPath));
      return st.isFile();
    } catch {
      return false;
    }
  }

  /** {@inheritDoc ImageSource.read} */
  async read(relPath: string): Promise<Buffer> {
    try {
      return await fs.promises.readFile(this.absolute(relPath));
    } catch (e) {
      throw new SnellaError('DATA', `${this.describe(relPath)}: cannot read file (${(e as Error).message})`);
    }
  }

  /**
   * Every regular file under the folder, as POSIX paths relative to it,
   * sorted by code unit; hidden files and folders are left out and symbolic
   * links are followed.
   * @throws Error if the folder cannot be read.
   */
  async list(): Promise<string[]> {
    const out: string[] = [];
    const walk = async (relDir: string): Promise<void> => {
      const abs = relDir ? path.join(this.location, relDir) : this.location;
      const entries = await fs.promises.readdir(abs, { withFileTypes: true });
      for (const ent of entries) {
        if (ent.name.startsWith('.')) continue;
        const rel = relDir ? `${relDir}/${ent.name}` : ent.name;
        let isDir = ent.isDirectory();
        let isFile = ent.isFile();
        if (ent.isSymbolicLink()) {
          try {
            const st = await fs.promises.stat(path.join(abs, ent.name));
            isDir = st.isDirectory();
            isFile = st.isFile();
          } catch {
            continue; // dangling link
          }
        }
        if (isDir) await walk(rel);
        else if (isFile) out.push(rel);
      }
    };
    await walk('');
    return out.sort(compareCodeUnits);
  }

  /** {@inheritDoc ImageSource.describe} */
  describe(relPath: string): string {
    return this.absolute(relPath);
  }

  private absolute(relPath: string): string {
    return path.join(this.location, ...normalizeRelPath(relPath).split('/'));
  }
}

/** Position of one regular file inside a tar archive. */
export interface TarEntry {
  /** Byte offset of the file's data from the start of the archive. */
  offset: number;
  /** Length of the file's data in bytes. */
  size: number;
}

const BLOCK = 512;
const WINDOW = 1 << 20;

/**
 * Files inside an uncompressed tar archive (ustar, pax and GNU long names;
 * headers decoded with node-tar's `Header` and `Pax`).
 *
 * {@link TarSource.open} reads every header once and keeps an index
 * (path → offset, size) in memory; {@link TarSource.read} then reads one entry
 * with a positioned read, so nothing but the index stays in memory. Only
 * regular files are indexed: directories, links and devices are ignored. When
 * a path occurs twice the later entry wins, as with `tar -x`.
 */
export class TarSource implements ImageSource {
  /** Absolute path of the archive. */
  readonly location: string;
  private readonly index: ReadonlyMap<string, TarEntry>;

  private constructor(location: string, index: Map<string, TarEntry>) {
    this.location = location;
    this.index = index;
  }

  /**
   * Indexes an archive.
   *
   * @param archivePath - path of an uncompressed `.tar` file.
   * @throws Error if the file cannot be opened, has a header with a bad
   *   checksum (not a tar, or corrupt: the byte offset is given), or ends
   *   inside an entry or a header block (truncated). An empty file is an
   *   empty archive.
   */
  static async open(archivePath: string): Promise<TarSource> {
    const location = path.resolve(archivePath);
    let fh: fs.promises.FileHandle;
    try {
      fh = await fs.promises.open(location, 'r');
    } catch (e) {
      throw new SnellaError('DATA', `cannot open tar archive ${location} (${(e as Error).message})`);
    }
    try {
      const fileSize = (await fh.stat()).size;
      let winStart = 0;
      let win = Buffer.alloc(0);
      const readAt = async (pos: number, len: number): Promise<Buffer> => {
        if (pos < winStart || pos + len > winStart + win.length) {
          const want = Math.min(Math.max(len, WINDOW), fileSize - pos);
          const buf = Buffer.alloc(want);
          let got = 0;
          while (got < want) {
            const { bytesRead } = await fh.read(buf, got, want - got, pos + got);
            if (bytesRead === 0) break;
            got += bytesRead;
          }
          winStart = pos;
          win = buf.subarray(0, got);
          if (got < len) {
            throw new SnellaError('DATA', `tar archive ${location} is truncated (needed ${len} bytes at byte ${pos})`);
          }
        }
        return win.subarray(pos - winStart, pos - winStart + len);
      };

      const index = new Map<string, TarEntry>();
      let ex: HeaderData | undefined;
      let gex: HeaderData | undefined;
      let pos = 0;
      let ended = false;
      while (pos + BLOCK <= fileSize) {
        const block = await readAt(pos, BLOCK);
        const h = new Header(block, 0, ex, gex);
        if (h.nullBlock) {
          ended = true; // end-of-archive marker
          break;
        }
        if (!h.cksumValid) {
          throw new SnellaError('DATA', 
            `${location} is not a valid tar archive (bad header checksum at byte ${pos})`,
          );
        }
        const size = h.size ?? 0;
        const dataStart = pos + BLOCK;
        if (dataStart + size > fileSize) {
          throw new SnellaError('DATA', 
            `tar archive ${location} is truncated: entry "${h.path ?? '?'}" needs ${size} bytes at byte ${dataStart}, the file has ${fileSize}`,
          );
        }
        const body = async (): Promise<string> => (await readAt(dataStart, size)).toString('utf8');
        switch (h.type) {
          case 'ExtendedHeader':
          case 'OldExtendedHeader':
            ex = Pax.parse(await body(), ex, false);
            break;
          case 'GlobalExtendedHeader':
            gex = Pax.parse(await body(), gex, true);
            break;
          case 'NextFileHasLongPath':
          case 'OldGnuLongPath':
            ex = { ...(ex ?? {}), path: (await body()).replace(/\0[\s\S]*$/, '') };
            break;
          case 'NextFileHasLongLinkpath':
            ex = { ...(ex ?? {}), linkpath: (await body()).replace(/\0[\s\S]*$/, '') };
            break;
          case 'File':
          case 'OldFile':
          case 'ContiguousFile': {
            // A pax/GNU long name replaces the header's name outright; node-tar's
            // Header would still prepend the ustar prefix field to it.
            const name = ex?.path ?? h.path;
            const rel = name === undefined ? '' : normalizeRelPath(name);
            if (rel) index.set(rel, { offset: dataStart, size });
            ex = undefined;
            break;
          }
          default:
            ex = undefined;
        }
        pos = dataStart + Math.ceil(size / BLOCK) * BLOCK;
      }
      // Without an end marker the archive must end exactly after an entry.
      if (!ended && pos !== fileSize) {
        throw new SnellaError('DATA', 
          `tar archive ${location} is truncated or not a tar file: it ends at byte ${fileSize}, inside ${
            pos > fileSize ? 'the padding of its last entry' : `the header block at byte ${pos}`
          }`,
        );
      }
      return new TarSource(location, index);
    } finally {
      await fh.close();
    }
  }

  /** Number of regular files in the archive. */
  get size(): number {
    return this.index.size;
  }

  /**
   * Offset and size of one entry, or undefined if there is none.
   * @param relPath - entry path; normalised with {@link normalizeRelPath}.
   */
  entry(relPath: string): TarEntry | undefined {
    return this.index.get(normalizeRelPath(relPath));
  }

  /** {@inheritDoc ImageSource.has} */
  async has(relPath: string): Promise<boolean> {
    return this.index.has(normalizeRelPath(relPath));
  }

  /** {@inheritDoc ImageSource.read} */
  async read(relPath: string): Promise<Buffer> {
    const ent = this.entry(relPath);
    if (!ent) throw new SnellaError('DATA', `${this.describe(relPath)}: no such entry in the archive`);
    const buf = Buffer.alloc(ent.size);
    const fh = await fs.promises.open(this.location, 'r').catch((e: Error) => {
      throw new SnellaError('DATA', `${this.describe(relPath)}: cannot open archive (${e.message})`);
    });
    try {
      let got = 0;
      while (got < ent.size) {
        const { bytesRead } = await fh.read(buf, got, ent.size - got, ent.offset + got);
        if (bytesRead === 0) {
          throw new SnellaError('DATA', `${this.describe(relPath)}: archive ended inside the entry (changed since it was indexed?)`);
        }
        got += bytesRead;
      }
    } finally {
      await fh.close();
    }
    return buf;
  }

  /** {@inheritDoc ImageSource.list} */
  async list(): Promise<string[]> {
    return [...this.index.keys()].filter((p) => !isHiddenPath(p)).sort(compareCodeUnits);
  }

  /** {@inheritDoc ImageSource.describe} */
  describe(relPath: string): string {
    return `${this.location}:${normalizeRelPath(relPath)}`;
  }
}
