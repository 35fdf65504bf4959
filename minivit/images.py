"""Image files to model inputs: load, make RGB, resize, centre-crop, normalise.

The steps, for a model that reads S x S images:

    1. open the file with Pillow and apply its EXIF orientation (a phone photo stored
       sideways is turned upright, as every image viewer shows it);
    2. make it 8-bit RGB, whatever its mode:
         greyscale (L, 1)          -> the grey value in all three channels
         with alpha (RGBA, LA, PA, palette or RGB with a transparent colour)
                                   -> composited onto a white background
         16-bit greyscale (I;16, I) -> scaled from 0..65535 to 0..255 (v / 257, rounded);
                                      Pillow's own conversion would clip at 255
         palette (P), CMYK, YCbCr, ... -> Pillow's conversion to RGB
    3. resize, keeping the aspect ratio, so that the shorter side is S (bicubic, with
       Pillow's antialiasing when shrinking), the longer side int(S * long / short);
    4. cut out the central S x S square;
    5. normalise per channel: x = (pixel / 255 - mean) / std, as float32 (C, S, S).

The normalisation is the one the model was trained with.  minivit's own checkpoints
store theirs (CIFAR-10's channel statistics for examples/train_cifar.py); the official
ViT checkpoints (google-research/vision_transformer) were trained on pixel / 127.5 - 1,
which is mean 0.5 and std 0.5 in this formula (OFFICIAL_NORMALIZATION).
"""
import warnings

from PIL import Image, ImageOps

from minivit import backend
from minivit.data.augment import normalize

np = backend.module_for("cpu")       # images are prepared on the host

OFFICIAL_NORMALIZATION = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
BACKGROUND = (255, 255, 255)         # what transparent pixels are composited onto
RESAMPLE = Image.Resampling.BICUBIC
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")


def to_rgb(image, background=BACKGROUND):
    """An 8-bit RGB copy of a Pillow image of any mode (see the module docstring)."""
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(image).astype(np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L")
    has_alpha = image.mode in ALPHA_MODES or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


MAX_PIXELS = 50_000_000          # 50 megapixels: a 0.5 MB PNG can declare 13000 x 13000


class ImageTooLargeError(ValueError):
    """An image with more pixels than the limit: decoding it could exhaust the memory."""


def load_image(path, max_pixels=MAX_PIXELS, notes=None):
    """The image at `path`, upright (EXIF orientation applied) and 8-bit RGB.

    The size in the file's header is checked before anything is decoded: an image over
    `max_pixels` (None: no limit) raises ImageTooLargeError; this limit replaces Pillow's
    own (Image.MAX_IMAGE_PIXELS).  Of an animated image (GIF, APNG, WebP, a multi-page
    TIFF) the first frame is used, and a line saying so is appended to `notes` (a list,
    if given).  Raises FileNotFoundError for a missing file and PIL.UnidentifiedImageError
    or OSError for one that is not a readable image."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None                 # max_pixels governs, not Pillow
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return _decode(image, max_pixels, notes)
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


def _decode(image, max_pixels, notes):
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"{width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} (decoding it would take {3 * width * height / 1e9:.1f} GB "
            "or more); raise the limit with --max-pixels if you mean it")
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and notes is not None:
        notes.append(f"{frames} frames (animated or multi-page); the first is used")
    image.load()                                 # decode now: a truncated file fails here
    return to_rgb(ImageOps.exif_transpose(image))


def resize_center_crop(image, size, resample=RESAMPLE):
    """Resize so the shorter side is `size` (aspect ratio kept), then cut the central
    size x size square."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"resize_center_crop: expected a positive integer size, got {size!r}")
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = max(size, int(size * long / short))
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def image_to_array(image):
    """uint8 array (C, H, W), channels first as the model reads them, of a Pillow image."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def prepare_image(path, size, resample=RESAMPLE, max_pixels=MAX_PIXELS, notes=None):
    """uint8 (3, size, size): the file at `path` loaded, made RGB, resized and centre-cropped
    (`notes` as in load_image)."""
    return image_to_array(resize_center_crop(load_image(path, max_pixels, notes), size,
                                             resample))


def normalize_batch(images, mean, std):
    """float32 (N, 3, S, S) = (images / 255 - mean) / std per channel, for uint8 (N, 3, S, S)."""
    return normalize(images, mean, std)
