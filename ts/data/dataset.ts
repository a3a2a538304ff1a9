/**
 * {@link ImageDataset}: labelled images from a VTAB-1k list file or an
 * ImageFolder, decoded to normalised float32 NCHW batches.
 *
 * @module
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { forEachLimit } from './concurrency';
import { decodeImage, ImageDecodeError } from './decode';
import { readListFile, type ListEntry } from './listfile';
import { normalizationTable, writeNCHW, type Normalization } from './normalize';
import { resolveDatasetOptions, type BadImagePolicy, type DatasetOptions } from './options';
import { DirSource, normalizeRelPath, TarSource, type ImageSource } from './source';
import { SnellaError } from '../errors';

/** One labelled image: where its bytes are and its class. */
export interface SampleRef {
  /** Folder or archive holding the file. */
  readonly source: ImageSource;
  /** POSIX path of the file inside `source`. */
  readonly path: string;
  /** Class index, integer in `0..numClasses-1`. */
  readonly label: number;
}

/** An image that `prepare()` dropped in `onBadImage: 'skip'` mode. */
export interface SkippedImage {
  /** The file: a path, or `<archive>:<entry>`. */
  file: string;
  /** Why it could not be decoded. */
  reason: string;
}

/** File name extensions (lower case) that {@link ImageDataset.fromImageFolder} takes as images. */
export const IMAGE_EXTENSIONS: ReadonlySet<string> = new Set(['.jpg', '.jpeg', '.png', '.webp']);

function isFile(p: string): boolean {
  try {
    return fs.statSync(p).isFile();
  } catch {
    return false;
  }
}

function isDirectory(p: string): boolean {
  try {
    return fs.statSync(p).isDirectory();
  } catch {
    return false;
  }
}

async function readClassNames(file: string): Promise<string[] | undefined> {
  if (!isFile(file)) return undefined;
  let parsed: unknown;
  try {
    parsed = JSON.parse(await fs.promises.readFile(file, 'utf8'));
  } catch (e) {
    throw new SnellaError('DATA', `${file}: not valid JSON (${(e as Error).message})`);
  }
  if (!Array.isArray(parsed) || !parsed.every((x) => typeof x === 'string')) {
    throw new SnellaError('DATA', `${file}: expected a JSON array of class-name strings (index = label)`);
  }
  return parsed as string[];
}

function listPreview(items: string[], max = 5): string {
  const head = items.slice(0, max).join(', ');
  return items.length > max ? `${head}, … (${items.length - max} more)` : head;
}

/**
 * A labelled image data set.
 *
 * Holds only {@link SampleRef}s until images are asked for. {@link load}
 * decodes (sharp: 3-channel sRGB, alpha flattened on black, bicubic resize to
 * `imageSize × imageSize` when the size differs) and normalises them to
 * float32 NCHW. Decoded images are kept in memory as uint8
 * (`imageSize² × 3` bytes each) unless `cache: false`.
 *
 * Bad images are dealt with by {@link prepare}: it decodes every image once,
 * `concurrency` at a time, filling the cache; with `onBadImage: 'skip'` it
 * removes the images that fail and lists them in {@link skipped}, so call
 * `await ds.prepare()` before using the length or indices of a skip-mode data
 * set. Without `prepare()`, or with `onBadImage: 'error'`, a bad image makes
 * `load()` throw.
 */
export class ImageDataset {
  /** Side of the output images in pixels. */
  readonly imageSize: number;
  /** Normalisation applied by {@link load}. */
  readonly normalization: Normalization;
  /** What {@link prepare} does with images that fail to decode. */
  readonly onBadImage: BadImagePolicy;
  /** Whether decoded images are kept in memory. */
  readonly cache: boolean;
  /** Images decoded at once. */
  readonly concurrency: number;
  /** Number of classes; every label is in `0..numClasses-1`. */
  readonly numClasses: number;
  /** Class names, index = label, when known (`classes.json` or folder names). */
  readonly classNames?: string[];
  /** Images removed by {@link prepare} in skip mode, in data set order. */
  readonly skipped: SkippedImage[] = [];

  private samplesArr: SampleRef[];
  private labelsArr: Int32Array;
  private readonly decoded = new Map<SampleRef, Uint8Array>();
  private readonly pending = new Map<SampleRef, Promise<Uint8Array>>();
  private readonly lut: Float32Array;
  private preparedFlag = false;

  /**
   * Builds a data set from sample references; the static constructors are
   * the usual entry points.
   *
   * @param samples - the images, in data set order (copied).
   * @param opts - see {@link DatasetOptions}.
   * @param classNames - optional class names, index = label.
   * @throws Error for invalid options, a label that is not an integer in
   *   `0..numClasses-1` (naming the file), or more class names than
   *   `numClasses`.
   */
  constructor(samples: readonly SampleRef[], opts: DatasetOptions, classNames?: string[]) {
    const o = resolveDatasetOptions(opts);
    this.imageSize = o.imageSize;
    this.normalization = o.normalization;
    this.onBadImage = o.onBadImage;
    this.cache = o.cache;
    this.concurrency = o.concurrency;
    let maxLabel = -1;
    for (const s of samples) {
      if (!Number.isInteger(s.label) || s.label < 0) {
        throw new SnellaError('DATA', `${s.source.describe(s.path)}: label must be an integer >= 0, got ${s.label}`);
      }
      maxLabel = Math.max(maxLabel, s.label);
    }
    this.numClasses = o.numClasses ?? classNames?.length ?? Math.max(1, maxLabel + 1);
    for (const s of samples) {
      if (s.label >= this.numClasses) {
        throw new SnellaError('DATA', 
          `${s.source.describe(s.path)}: label ${s.label} is out of range 0..${this.numClasses - 1} (numClasses ${this.numClasses})`,
        );
      }
    }
    if (classNames !== undefined) {
      if (classNames.length > this.numClasses) {
        throw new SnellaError('DATA', `${classNames.length} class names given but numClasses is ${this.numClasses}`);
      }
      this.classNames = [...classNames];
    }
    this.samplesArr = samples.map((s) => ({ source: s.source, path: s.path, label: s.label }));
    this.labelsArr = Int32Array.from(this.samplesArr, (s) => s.label);
    this.lut = normalizationTable(this.normalization);
  }

  /** Number of images. */
  get length(): number {
    return this.samplesArr.length;
  }

  /** Label of every image, `[length]` int32, index = sample index. Do not modify. */
  get labels(): Int32Array {
    return this.labelsArr;
  }

  /** The sample references, index = sample index. */
  get samples(): readonly SampleRef[] {
    return this.samplesArr;
  }

  /** Whether {@link prepare} has completed. */
  get prepared(): boolean {
    return this.preparedFlag;
  }

  /** Number of decoded images held in memory. */
  get cachedCount(): number {
    return this.decoded.size;
  }

  /** Drops every cached decoded image. */
  clearCache(): void {
    this.decoded.clear();
  }

  /**
   * Name of sample `i`'s file for messages (a path, or `<archive>:<entry>`).
   * @throws RangeError if `i` is not a valid index.
   */
  describe(i: number): string {
    const s = this.sampleAt(i, 'index');
    return s.source.describe(s.path);
  }

  /**
   * The decoded pixels of one image, `[imageSize, imageSize, 3]` uint8 sRGB,
   * row-major and channel last (from the cache when present; do not modify).
   *
   * @param i - sample index, integer in `0..length-1`.
   * @throws RangeError for a bad index; ImageDecodeError naming the file if
   *   it cannot be decoded; Error naming the file if it cannot be read.
   */
  async image(i: number): Promise<Uint8Array> {
    return this.pixelsOf(this.sampleAt(i, 'index'));
  }

  /**
   * Decodes and normalises a batch of images.
   *
   * @param indices - sample indices, each an integer in `0..length-1`
   *   (repeats allowed).
   * @returns float32 NCHW `[indices.length, 3, imageSize, imageSize]`,
   *   channel order R, G, B, value `(x / 255 − mean[c]) / std[c]` for
   *   8-bit pixel value x.
   * @throws RangeError naming the first bad index; ImageDecodeError naming
   *   the file (and, in skip mode before `prepare()`, saying so) if an image
   *   cannot be decoded; Error naming the file if it cannot be read.
   */
  async load(indices: readonly number[]): Promise<Float32Array> {
    const refs = indices.map((i, k) => this.sampleAt(i, `indices[${k}]`));
    const s = this.imageSize;
    const out = new Float32Array(refs.length * 3 * s * s);
    try {
      await forEachLimit(refs, this.concurrency, async (ref, k) => {
        writeNCHW(out, k, await this.pixelsOf(ref), s, this.lut);
      });
    } catch (e) {
      if (e instanceof ImageDecodeError && this.onBadImage === 'skip' && !this.preparedFlag) {
        throw new ImageDecodeError(
          e.file,
          `${e.reason} (onBadImage 'skip' drops bad images in prepare(): call await dataset.prepare() before load())`,
        );
      }
      throw e;
    }
    return out;
  }

  /**
   * Decodes every image once, `concurrency` at a time, filling the cache
   * (with `cache: false` the pixels are only checked, then dropped).
   *
   * With `onBadImage: 'skip'` the images that fail to decode are removed
   * from the data set (indices of later images shift down; `labels` and
   * `length` change) and recorded in {@link skipped}. Calling it again
   * re-checks only what is not cached.
   *
   * @returns this data set.
   * @throws ImageDecodeError naming the file for the first bad image in
   *   `'error'` mode; Error if every image is bad in `'skip'` mode; Error
   *   naming the file if one cannot be read.
   */
  async prepare(): Promise<this> {
    const refs = this.samplesArr.slice();
    const bad = new Map<SampleRef, string>();
    await forEachLimit(refs, this.concurrency, async (ref) => {
      try {
        await this.pixelsOf(ref);
      } catch (e) {
        if (e instanceof ImageDecodeError && this.onBadImage === 'skip') {
          bad.set(ref, e.reason);
          return;
        }
        throw e;
      }
    });
    if (bad.size > 0) {
      if (bad.size === refs.length) {
        const first = refs[0];
        throw new SnellaError('DATA', 
          `all ${refs.length} images failed to decode, e.g. ${first.source.describe(first.path)}: ${bad.get(first)}`,
        );
      }
      for (const ref of refs) {
        const reason = bad.get(ref);
        if (reason !== undefined) this.skipped.push({ file: ref.source.describe(ref.path), reason });
      }
      this.samplesArr = this.samplesArr.filter((r) => !bad.has(r));
      this.labelsArr = Int32Array.from(this.samplesArr, (r) => r.label);
    }
    this.preparedFlag = true;
    return this;
  }

  private sampleAt(i: number, what: string): SampleRef {
    if (!Number.isInteger(i) || i < 0 || i >= this.samplesArr.length) {
      throw new RangeError(`${what} must be an integer in 0..${this.samplesArr.length - 1}, got ${i}`);
    }
    return this.samplesArr[i];
  }

  private pixelsOf(ref: SampleRef): Promise<Uint8Array> {
    const hit = this.decoded.get(ref);
    if (hit) return Promise.resolve(hit);
    const inFlight = this.pending.get(ref);
    if (inFlight) return inFlight;
    const p = (async () => {
      const bytes = await ref.source.read(ref.path);
      const px = await decodeImage(bytes, this.imageSize, ref.source.describe(ref.path));
      if (this.cache) this.decoded.set(ref, px);
      return px;
    })();
    this.pending.set(ref, p);
    const clear = (): void => {
      this.pending.delete(ref);
    };
    p.then(clear, clear);
    return p;
  }

  /**
   * A data set described by a VTAB-1k style list file.
   *
   * Each list line is `<image path> <label>` (see `parseListText`). Image
   * paths are looked up inside `root/images.tar` when that file exists, else
   * as files under `root`. Class names come from `root/classes.json` (a JSON
   * array of strings, index = label) when present, and then set the default
   * `numClasses`.
   *
   * @param root - data set folder.
   * @param listFile - list file, relative to `root` (or absolute), e.g.
   *   `"train800val200.txt"`.
   * @param opts - see {@link DatasetOptions}.
   * @throws Error `"list file not found: <path>"`; `"<list>:<line>: ..."` for
   *   a line that does not parse or a label out of range `0..numClasses-1`;
   *   an error naming the list, the archive/folder and the missing paths if
   *   listed images are absent; an error for an empty list, a bad
   *   `classes.json`, a root that is not a folder, or a corrupt archive.
   */
  static async fromList(root: string, listFile: string, opts: DatasetOptions): Promise<ImageDataset> {
    const o = resolveDatasetOptions(opts);
    const rootAbs = path.resolve(root);
    const listPath = path.resolve(rootAbs, listFile);
    const entries = await readListFile(listPath);
    if (entries.length === 0) throw new SnellaError('DATA', `list file ${listPath} lists no images`);
    if (!isDirectory(rootAbs)) throw new SnellaError('DATA', `data set root ${rootAbs} is not a folder`);

    const classNames = await readClassNames(path.join(rootAbs, 'classes.json'));
    const numClasses = o.numClasses ?? classNames?.length;
    if (numClasses !== undefined) {
      const why = o.numClasses !== undefined ? 'numClasses' : `${classNames?.length} names in classes.json`;
      for (const e of entries) {
        if (e.label >= numClasses) {
          throw new SnellaError('DATA', `${listPath}:${e.line}: label ${e.label} is out of range 0..${numClasses - 1} (${why})`);
        }
      }
    }

    const tarPath = path.join(rootAbs, 'images.tar');
    const source: ImageSource = isFile(tarPath) ? await TarSource.open(tarPath) : new DirSource(rootAbs);
    const missing: ListEntry[] = [];
    await forEachLimit(entries, 32, async (e) => {
      if (!(await source.has(e.path))) missing.push(e);
    });
    if (missing.length > 0) {
      missing.sort((a, b) => a.line - b.line);
      const where = source instanceof TarSource ? `archive ${source.location}` : `folder ${source.location}`;
      throw new SnellaError('DATA', 
        `${missing.length} image(s) listed in ${listPath} are missing from ${where}: ${listPreview(missing.map((e) => `${e.path} (line ${e.line})`))}`,
      );
    }
    const samples = entries.map((e) => ({ source, path: normalizeRelPath(e.path), label: e.label }));
    return new ImageDataset(samples, opts, classNames);
  }

  /**
   * A torchvision-style ImageFolder: each top-level folder is a class, and
   * its label is the folder's rank among the class folder names sorted by
   * code unit (so `ant/`, `bee/`, `cat/` get 0, 1, 2). Images are the files
   * with a `.jpg`, `.jpeg`, `.png` or `.webp` extension (any case) anywhere
   * under a class folder, in path order; other files, files at the top level
   * and hidden files are ignored. `classNames` are the folder names.
   *
   * @param dir - a folder, or an uncompressed `.tar` archive whose top-level
   *   folders are the classes.
   * @param opts - see {@link DatasetOptions}; `numClasses`, if given, must be
   *   at least the number of class folders.
   * @throws Error if `dir` does not exist or is neither folder nor `.tar`;
   *   if it has no class folder; if a class folder holds no image (naming
   *   it); if `numClasses` is too small; or if the archive is corrupt.
   */
  static async fromImageFolder(dir: string, opts: DatasetOptions): Promise<ImageDataset> {
    const o = resolveDatasetOptions(opts);
    const abs = path.resolve(dir);
    let source: ImageSource;
    const classSet = new Set<string>();
    if (isDirectory(abs)) {
      source = new DirSource(abs);
      for (const ent of await fs.promises.readdir(abs, { withFileTypes: true })) {
        if (ent.name.startsWith('.')) continue;
        if (ent.isDirectory() || (ent.isSymbolicLink() && isDirectory(path.join(abs, ent.name)))) {
          classSet.add(ent.name);
        }
      }
    } else if (isFile(abs) && abs.toLowerCase().endsWith('.tar')) {
      source = await TarSource.open(abs);
    } else if (fs.existsSync(abs)) {
      throw new SnellaError('DATA', `${abs} is neither a folder nor a .tar archive`);
    } else {
      throw new SnellaError('DATA', `image folder not found: ${abs}`);
    }

    const files = await source.list();
    const byClass = new Map<string, string[]>();
    for (const f of files) {
      const slash = f.indexOf('/');
      if (slash < 0) continue; // file at the top level
      const cls = f.slice(0, slash);
      classSet.add(cls);
      if (!IMAGE_EXTENSIONS.has(path.posix.extname(f).toLowerCase())) continue;
      let list = byClass.get(cls);
      if (!list) byClass.set(cls, (list = []));
      list.push(f);
    }
    const classNames = [...classSet].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    if (classNames.length === 0) {
      throw new SnellaError('DATA', `no class folders in ${abs} (expected <class>/<image> paths)`);
    }
    const empty = classNames.filter((c) => !byClass.has(c));
    if (empty.length > 0) {
      throw new SnellaError('DATA', 
        `class folder(s) without images (${[...IMAGE_EXTENSIONS].join(', ')}) in ${abs}: ${listPreview(empty)}`,
      );
    }
    if (o.numClasses !== undefined && o.numClasses < classNames.length) {
      throw new SnellaError('DATA', `numClasses is ${o.numClasses} but ${abs} has ${classNames.length} class folders`);
    }
    const samples: SampleRef[] = [];
    classNames.forEach((cls, label) => {
      for (const f of byClass.get(cls)!) samples.push({ source, path: f, label });
    });
    return new ImageDataset(samples, opts, classNames);
  }

  /**
   * Opens a data set, choosing the layout from what is on disk:
   *
   * - a folder and `split` given: `<path>/<split>.txt` → {@link fromList};
   *   else `<path>/<split>/` or `<path>/<split>.tar` → {@link fromImageFolder};
   * - a folder and no `split`: {@link fromImageFolder} on the folder, unless
   *   it holds `.txt` list files (then a split is required);
   * - a `.tar` file: {@link fromImageFolder} (`split` must be undefined);
   * - a `.txt` file: {@link fromList} with its folder as root.
   *
   * @param p - folder, `.tar` archive or list file.
   * @param split - list name without `.txt` (e.g. `"train800val200"`), or a
   *   sub-folder / sub-archive name; undefined for a plain ImageFolder.
   * @param opts - see {@link DatasetOptions}.
   * @throws Error if `p` does not exist, if the split is not found (listing
   *   the list files present), if a split is needed but not given or given
   *   for a `.tar`, plus the errors of the chosen constructor.
   *
   * @example
   * ```ts
   * const model = VitModel.load('assets/models/vit_tiny_patch8_64.safetensors');
   * const { img_size, mean, std } = model.config;
   * const opts = { imageSize: img_size, normalization: { mean, std } };
   * // VTAB-1k layout: train.txt / test.txt lists + images.tar
   * const train = await ImageDataset.open('assets/flowers10-64', 'train', opts);
   * // ImageFolder: my-photos/<class>/<image>.jpg
   * const mine = await ImageDataset.open('my-photos', undefined, opts);
   * console.log(train.length, train.numClasses, mine.classNames);
   * const x = await train.load([0, 1]); // Float32Array [2, 3, 64, 64]
   * ```
   */
  static async open(p: string, split: string | undefined, opts: DatasetOptions): Promise<ImageDataset> {
    resolveDatasetOptions(opts);
    const abs = path.resolve(p);
    if (!fs.existsSync(abs)) throw new SnellaError('DATA', `data set path not found: ${abs}`);
    if (isFile(abs)) {
      const lower = abs.toLowerCase();
      if (lower.endsWith('.tar')) {
        if (split !== undefined) {
          throw new SnellaError('DATA', 
            `split ${JSON.stringify(split)} given for ${abs}, but a .tar archive is opened as one ImageFolder (pass no split)`,
          );
        }
        return ImageDataset.fromImageFolder(abs, opts);
      }
      if (lower.endsWith('.txt')) {
        if (split !== undefined && split !== path.basename(abs, '.txt')) {
          throw new SnellaError('DATA', `split ${JSON.stringify(split)} given together with the list file ${abs}`);
        }
        return ImageDataset.fromList(path.dirname(abs), path.basename(abs), opts);
      }
      throw new SnellaError('DATA', `${abs}: expected a data set folder, a .tar archive or a .txt list file`);
    }
    const listFiles = (await fs.promises.readdir(abs)).filter((n) => n.endsWith('.txt')).sort();
    if (split === undefined) {
      if (listFiles.length > 0) {
        throw new SnellaError('DATA', `${abs} holds list files (${listPreview(listFiles)}): pass a split, e.g. ${JSON.stringify(listFiles[0].slice(0, -4))}`);
      }
      return ImageDataset.fromImageFolder(abs, opts);
    }
    if (split === '' || split.includes('/') || split.includes('\\')) {
      throw new SnellaError('DATA', `split must be a plain name such as "train800val200", got ${JSON.stringify(split)}`);
    }
    const listName = split.endsWith('.txt') ? split : `${split}.txt`;
    if (isFile(path.join(abs, listName))) return ImageDataset.fromList(abs, listName, opts);
    if (isDirectory(path.join(abs, split))) return ImageDataset.fromImageFolder(path.join(abs, split), opts);
    if (isFile(path.join(abs, `${split}.tar`))) return ImageDataset.fromImageFolder(path.join(abs, `${split}.tar`), opts);
    throw new SnellaError('DATA', 
      `split ${JSON.stringify(split)} not found in ${abs}: expected ${listName}, ${split}/ or ${split}.tar` +
        (listFiles.length > 0 ? `; list files there: ${listPreview(listFiles)}` : ''),
    );
  }
}
