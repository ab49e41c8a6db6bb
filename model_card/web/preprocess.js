// Photos decoded and preprocessed as the Python pipeline does it (`images.load_rgb_image`, then transformers' PIL
// image processor, CLIPImageProcessorPil), pixel for pixel: the shortest edge resized with Pillow's bicubic filter
// in its 8-bit fixed-point arithmetic, the centre cropped (and padded with zeros where the crop is larger), rescaled
// in float64, normalised in float32. Anything less exact would move answers away from the pipeline's; no library
// offers Pillow's resampling in the browser.

const BICUBIC = 3; // PIL.Image.Resampling.BICUBIC, the `resample` of CLIP's preprocessor_config.json
const BICUBIC_SUPPORT = 2.0;
// Pillow's fixed-point coefficients: 32 bits less 8 for the pixel value and 2 for overflow.
const PRECISION_BITS = 32 - 8 - 2;

function bicubic(x) {
  // Pillow's bicubic_filter, a = -0.5.
  const a = -0.5;
  x = Math.abs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// Pillow's precompute_coeffs and normalize_coeffs_8bpc: for each output pixel, the first input pixel, the number of
// input pixels, and their fixed-point weights (C's (int) casts are Math.trunc).
function coefficients(inSize, outSize) {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1.0);
  const support = BICUBIC_SUPPORT * filterScale;
  const inverseScale = 1.0 / filterScale; // multiplied, not divided: the last bit of each weight is Pillow's
  const kernelSize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const weights = new Int32Array(outSize * kernelSize);
  const kernel = new Float64Array(kernelSize);
  for (let out = 0; out < outSize; out++) {
    const center = (out + 0.5) * scale;
    let first = Math.trunc(center - support + 0.5);
    if (first < 0) first = 0;
    let count = Math.trunc(center + support + 0.5);
    if (count > inSize) count = inSize;
    count -= first;
    let total = 0.0;
    for (let x = 0; x < count; x++) {
      kernel[x] = bicubic((x + first - center + 0.5) * inverseScale);
      total += kernel[x];
    }
    for (let x = 0; x < count; x++) {
      const weight = total !== 0.0 ? kernel[x] / total : kernel[x];
      weights[out * kernelSize + x] = Math.trunc(weight < 0 ? -0.5 + weight * (1 << PRECISION_BITS) : 0.5 + weight * (1 << PRECISION_BITS));
    }
    bounds[out * 2] = first;
    bounds[out * 2 + 1] = count;
  }
  return { kernelSize, bounds, weights };
}

function clip8(sum) {
  const value = sum >> PRECISION_BITS;
  return value < 0 ? 0 : value > 255 ? 255 : value;
}

// One pass of Pillow's two-pass resampling over RGB pixels (3 bytes each): along x when `horizontal`, else along y.
// `rowOffset` is the first input row the horizontal pass reads (ImagingResampleInner's ybox_first).
function resamplePass(input, inWidth, outWidth, outHeight, plan, horizontal, rowOffset) {
  const output = new Uint8Array(outWidth * outHeight * 3);
  const { kernelSize, bounds, weights } = plan;
  for (let y = 0; y < outHeight; y++) {
    for (let x = 0; x < outWidth; x++) {
      const target = horizontal ? x : y;
      const first = bounds[target * 2];
      const count = bounds[target * 2 + 1];
      const base = target * kernelSize;
      let r = 1 << (PRECISION_BITS - 1);
      let g = r;
      let b = r;
      for (let i = 0; i < count; i++) {
        const source = horizontal ? ((y + rowOffset) * inWidth + first + i) * 3 : ((first + i) * inWidth + x) * 3;
        const weight = weights[base + i];
        r += input[source] * weight;
        g += input[source + 1] * weight;
        b += input[source + 2] * weight;
      }
      const at = (y * outWidth + x) * 3;
      output[at] = clip8(r);
      output[at + 1] = clip8(g);
      output[at + 2] = clip8(b);
    }
  }
  return output;
}

// Pillow's Image.resize(size, BICUBIC) of 8-bit RGB pixels: the horizontal pass over the rows the vertical pass
// reads, then the vertical pass; a pass whose size does not change is skipped, and an unchanged image is copied.
export function resizeBicubic(rgb, width, height, outWidth, outHeight) {
  if (outWidth === width && outHeight === height) return rgb.slice();
  const vertical = coefficients(height, outHeight);
  let pixels = rgb;
  let rows = height;
  if (outWidth !== width) {
    const firstRow = vertical.bounds[0];
    const lastRow = vertical.bounds[outHeight * 2 - 2] + vertical.bounds[outHeight * 2 - 1];
    for (let y = 0; y < outHeight; y++) vertical.bounds[y * 2] -= firstRow;
    rows = lastRow - firstRow;
    pixels = resamplePass(rgb, width, outWidth, rows, coefficients(width, outWidth), true, firstRow);
  }
  if (outHeight !== height) pixels = resamplePass(pixels, outWidth, outWidth, outHeight, vertical, false, 0);
  return pixels;
}

// transformers' get_resize_output_image_size with default_to_square=False: the short edge to `shortestEdge`, the
// long edge scaled and truncated as Python's int() does.
function shortEdgeSize(width, height, shortestEdge) {
  const [short, long] = width <= height ? [width, height] : [height, width];
  const newLong = Math.trunc((shortestEdge * long) / short);
  return width <= height ? [shortestEdge, newLong] : [newLong, shortestEdge];
}

// transformers' center_crop of channels-last pixels: offsets floored as Python's //, and zeros where the crop reaches
// beyond the image (its padding, centred with ceil).
function centerCrop(rgb, width, height, cropWidth, cropHeight) {
  const paddedWidth = Math.max(cropWidth, width);
  const paddedHeight = Math.max(cropHeight, height);
  const top = Math.floor((height - cropHeight) / 2) + Math.ceil((paddedHeight - height) / 2);
  const left = Math.floor((width - cropWidth) / 2) + Math.ceil((paddedWidth - width) / 2);
  const topPad = Math.ceil((paddedHeight - height) / 2);
  const leftPad = Math.ceil((paddedWidth - width) / 2);
  const output = new Uint8Array(cropWidth * cropHeight * 3);
  for (let y = 0; y < cropHeight; y++) {
    const sourceY = y + Math.max(0, top) - topPad;
    if (sourceY < 0 || sourceY >= height) continue;
    for (let x = 0; x < cropWidth; x++) {
      const sourceX = x + Math.max(0, left) - leftPad;
      if (sourceX < 0 || sourceX >= width) continue;
      output.set(rgb.subarray((sourceY * width + sourceX) * 3, (sourceY * width + sourceX) * 3 + 3), (y * cropWidth + x) * 3);
    }
  }
  return output;
}

// A photo's 8-bit RGB pixels as the Python pipeline reads them: EXIF orientation applied, no colour management (PIL
// applies none), transparency over white.
export async function decodeImage(file) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(file, { imageOrientation: "from-image", colorSpaceConversion: "none", premultiplyAlpha: "none" });
  } catch {
    throw new Error("not an image format this browser can decode");
  }
  const { width, height } = bitmap;
  const canvas = new OffscreenCanvas(width, height);
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.fillStyle = "#ffffff";
  context.fillRect(0, 0, width, height);
  context.drawImage(bitmap, 0, 0);
  bitmap.close();
  const rgba = context.getImageData(0, 0, width, height).data;
  const rgb = new Uint8Array(width * height * 3);
  for (let i = 0; i < width * height; i++) rgb.set(rgba.subarray(i * 4, i * 4 + 3), i * 3);
  return { rgb, width, height };
}

// The settings of a preprocessor_config.json that this page can follow, or an Error that names what it cannot.
export function imageSettings(config, imageSize) {
  const settings = {
    resize: config.do_resize !== false,
    crop: config.do_center_crop !== false,
    rescale: config.do_rescale !== false,
    normalize: config.do_normalize !== false,
    resample: config.resample ?? BICUBIC,
    size: config.size ?? {},
    cropSize: config.crop_size ?? {},
    rescaleFactor: config.rescale_factor ?? 1 / 255,
    mean: config.image_mean ?? [0.48145466, 0.4578275, 0.40821073],
    std: config.image_std ?? [0.26862954, 0.26130258, 0.27577711],
  };
  if (settings.resize && settings.resample !== BICUBIC) {
    throw new Error(`preprocessor_config.json asks for resample ${settings.resample}; this page resizes as Pillow's bicubic filter (3) only.`);
  }
  const fixedSize = settings.size.height && settings.size.width;
  if (settings.resize && !fixedSize && (!settings.size.shortest_edge || settings.size.longest_edge)) {
    throw new Error(`preprocessor_config.json has size ${JSON.stringify(settings.size)}; this page takes {"shortest_edge": N} or {"height": H, "width": W}.`);
  }
  const final = settings.crop ? settings.cropSize : fixedSize && settings.resize ? settings.size : null;
  if (!final || final.height !== imageSize || final.width !== imageSize) {
    throw new Error(`preprocessor_config.json does not give ${imageSize} x ${imageSize} pixels, the model's input; set crop_size to that size.`);
  }
  return settings;
}

// `pixel_values` of one image (channels first, float32) from its 8-bit RGB pixels (channels last).
export function pixelValues(rgb, width, height, settings) {
  if (settings.resize) {
    const [outWidth, outHeight] = settings.size.shortest_edge
      ? shortEdgeSize(width, height, settings.size.shortest_edge)
      : [settings.size.width, settings.size.height];
    rgb = resizeBicubic(rgb, width, height, outWidth, outHeight);
    [width, height] = [outWidth, outHeight];
  }
  if (settings.crop) {
    rgb = centerCrop(rgb, width, height, settings.cropSize.width, settings.cropSize.height);
    [width, height] = [settings.cropSize.width, settings.cropSize.height];
  }
  // Each channel's 256 values as the processor computes them: rescaled in float64, then float32 arithmetic.
  const tables = [0, 1, 2].map((channel) => {
    const table = new Float32Array(256);
    const mean = Math.fround(settings.mean[channel]);
    const std = Math.fround(settings.std[channel]);
    for (let value = 0; value < 256; value++) {
      let pixel = Math.fround(settings.rescale ? value * settings.rescaleFactor : value);
      if (settings.normalize) pixel = Math.fround(Math.fround(pixel - mean) / std);
      table[value] = pixel;
    }
    return table;
  });
  const plane = width * height;
  const values = new Float32Array(3 * plane);
  for (let i = 0; i < plane; i++) {
    for (let channel = 0; channel < 3; channel++) values[channel * plane + i] = tables[channel][rgb[i * 3 + channel]];
  }
  return values;
}
