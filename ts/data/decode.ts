/**
 * Image decoding with sharp (libvips): any JPEG, PNG, WebP, GIF, TIFF or AVIF
 * that libvips reads becomes a square 8-bit sRGB image.
 *
 * @module
 */
import sharp from 'sharp';
import { SnellaError } from '../errors';

/**
 * A file that is not a readable image: empty, truncated, corrupt or of an
 * unknown format.
 *
 * `message` is `"<file>: cannot decode image: <reason>"`.
 */
export class ImageDecodeError extends SnellaError {
  /** The file, as given to {@link decodeImage} (a path, or `archive:entry`). */
  readonly file: string;
  /** What went wrong, one line (e.g. `"VipsJpeg: premature end of JPEG image"`). */
  readonly reason: string;

  /**
   * An error for one file.
   * @param file - the file's name as shown to the user.
   * @param reason - what went wrong, one line.
   */
  constructor(file: string, reason: string) {
    super('DATA', `${file}: cannot decode image: ${reason}`);
    this.name = 'ImageDecodeError';
    this.file = file;
    this.reason = reason;
  }
}

function oneLine(s: string): string {
  return s
    .split(/\r?\n/)
    .map((l) => l.trim())
    .filter((l) => l.length > 0)
    .join('; ');
}

/**
 * Decodes an encoded image to `[imageSize, imageSize, 3]` uint8 sRGB pixels
 * (row-major, channel last).
 *
 * - Colour: grayscale is replicated to R=G=B; CMYK and images with an ICC
 *   profile are converted to sRGB (sharp's default colour management);
 *   16-bit images are scaled to 8 bits.
 * - Alpha: composited over black (`flatten`), so a pixel with alpha `a`
 *   becomes `round(rgb * a / 255)`; a fully transparent pixel becomes 0.
 * - Size: resized to `imageSize × imageSize` with bicubic (Catmull-Rom,
 *   sharp `kernel: 'cubic'`, `fit: 'fill'`, aspect not kept, no JPEG
 *   shrink-on-load) only when width or height differs from `imageSize`;
 *   otherwise the decoded pixels are returned unchanged.
 * - EXIF orientation is ignored (as PIL/torchvision do); animated images give
 *   their first frame.
 * - Decoding is strict (sharp `failOn: 'warning'`): a truncated JPEG is an
 *   error, not a partially grey image.
 *
 * @param bytes - the file's content.
 * @param imageSize - output side in pixels, integer ≥ 1.
 * @param file - name of the file for error messages.
 * @returns Uint8Array of length `imageSize * imageSize * 3`.
 * @throws ImageDecodeError if the bytes are empty or cannot be decoded.
 * @throws RangeError if `imageSize` is not an integer ≥ 1.
 */
export async function decodeImage(bytes: Uint8Array, imageSize: number, file: string): Promise<Uint8Array> {
  if (!Number.isInteger(imageSize) || imageSize < 1) {
    throw new RangeError(`imageSize must be an integer >= 1, got ${imageSize}`);
  }
  if (bytes.length === 0) throw new ImageDecodeError(file, 'empty file (0 bytes)');
  try {
    const img = sharp(bytes, { failOn: 'warning', autoOrient: false });
    const meta = await img.metadata();
    if (!meta.width || !meta.height) throw new SnellaError('DATA', 'image has no width/height');
    let p = img;
    if (meta.hasAlpha) p = p.flatten({ background: { r: 0, g: 0, b: 0 } });
    if (meta.width !== imageSize || meta.height !== imageSize) {
      p = p.resize(imageSize, imageSize, { fit: 'fill', kernel: 'cubic', fastShrinkOnLoad: false });
    }
    const { data, info } = await p
      .toColourspace('srgb')
      .raw({ depth: 'uchar' })
      .toBuffer({ resolveWithObject: true });
    if (info.width !== imageSize || info.height !== imageSize || info.channels !== 3) {
      throw new SnellaError('DATA', 
        `decoder produced ${info.width}x${info.height}x${info.channels}, expected ${imageSize}x${imageSize}x3`,
      );
    }
    // Copy when the result is a view into a larger allocation, so that a
    // cached image holds exactly its own pixels.
    return data.byteOffset === 0 && data.buffer.byteLength === data.byteLength
      ? new Uint8Array(data.buffer, 0, data.byteLength)
      : Uint8Array.prototype.slice.call(data);
  } catch (e) {
    if (e instanceof ImageDecodeError) throw e;
    throw new ImageDecodeError(file, oneLine((e as Error).message ?? String(e)));
  }
}
