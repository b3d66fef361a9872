//! Image bytes → packed RGB8, with the semantics of PIL's `Image.open(f).convert('RGB')`.
//!
//! * JPEG goes through libjpeg-turbo (the `turbojpeg` crate), the decoder PIL itself uses, with the
//!   same settings (accurate integer IDCT, fancy upsampling), so the pixels are PIL's bit for bit.
//!   Grayscale is replicated; CMYK/YCCK is read with Adobe polarity (as PIL always assumes) and
//!   converted with PIL's `cmyk2rgb` integer formula.
//! * PNG, GIF (first frame), WebP, BMP, TIFF go through the `image` crate. Alpha is dropped, not
//!   composited (PIL's RGBA→RGB); palettes are expanded; gray is replicated.
//! * 16-bit samples keep their high byte. PIL does the same for 16-bit RGB, but clamps 16-bit
//!   *grayscale* (mode `I;16`) to 255, which turns almost every such image white; doppler
//!   deliberately scales instead (documented deviation).
//!
//! Limits on dimensions and pixel count are checked from the header, before any pixel buffer is
//! allocated.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader};

use crate::error::{Error, ErrorKind, Result};

/// A decoded picture: `width * height` pixels, 3 bytes each, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// Decoder limits, enforced from the header before allocating.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest accepted width × height.
    pub max_pixels: u64,
    /// Largest accepted width or height.
    pub max_dimension: u32,
    /// Decode JPEGs at a reduced DCT scale (1/2, 1/4 or 1/8, the smallest that keeps both sides at
    /// least this many pixels), like PIL's `Image.draft`: much faster for large photos, but the
    /// pixels differ from a full decode. 0 (the default): always decode at full size.
    pub jpeg_draft_size: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pixels: 100_000_000,
            max_dimension: 65_535,
            jpeg_draft_size: 0,
        }
    }
}

impl Limits {
    /// The same limits, decoding at full size (a dHash is imagehash's only from a full decode).
    pub fn full_decode(&self) -> Limits {
        Limits {
            jpeg_draft_size: 0,
            ..*self
        }
    }

    fn check(&self, what: &str, w: u64, h: u64) -> Result<()> {
        if w == 0 || h == 0 {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("{what} has no pixels ({w}x{h})"),
            ));
        }
        if w > self.max_dimension as u64 || h > self.max_dimension as u64 {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!(
                    "{what} is {w}x{h} pixels, over the limit of {} pixels per side",
                    self.max_dimension
                ),
            )
            .with_hint("Raise doppler.max_image_dimension to accept it."));
        }
        if w * h > self.max_pixels {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!(
                    "{what} is {w}x{h} = {} pixels, over the limit of {} pixels",
                    w * h,
                    self.max_pixels
                ),
            )
            .with_hint("Raise doppler.max_image_pixels to accept it."));
        }
        Ok(())
    }
}

/// Decodes `bytes` (described as `what` in messages) to RGB8.
pub fn decode_rgb(bytes: &[u8], what: &str, limits: &Limits) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(Error::new(
            ErrorKind::NotAnImage,
            format!("{what} is empty"),
        ));
    }
    if bytes.len() >= 3 && bytes[..3] == [0xFF, 0xD8, 0xFF] {
        return decode_jpeg(bytes, what, limits);
    }
    let format = image::guess_format(bytes).map_err(|_| {
        Error::new(
            ErrorKind::NotAnImage,
            format!("{what} is not an image: its format is not recognized"),
        )
        .with_hint("Supported formats: JPEG, PNG, GIF, WebP, BMP, TIFF.")
    })?;
    match format {
        ImageFormat::Png
        | ImageFormat::Gif
        | ImageFormat::WebP
        | ImageFormat::Bmp
        | ImageFormat::Tiff => {}
        other => {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("{what} is in the unsupported image format {other:?}"),
            )
            .with_hint("Supported formats: JPEG, PNG, GIF, WebP, BMP, TIFF."))
        }
    }
    let fmt_name = format!("{format:?}").to_uppercase();
    let reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| image_error(what, &fmt_name, e))?;
    let (w, h) = decoder.dimensions();
    limits.check(what, w as u64, h as u64)?;
    let mut lim = image::Limits::default();
    lim.max_image_width = Some(limits.max_dimension);
    lim.max_image_height = Some(limits.max_dimension);
    // the largest buffer a decoder may need: 16-bit RGBA, plus slack for its own state
    lim.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    decoder
        .set_limits(lim)
        .map_err(|e| image_error(what, &fmt_name, e))?;
    let img = DynamicImage::from_decoder(decoder).map_err(|e| image_error(what, &fmt_name, e))?;
    Ok(to_rgb8(img))
}

fn image_error(what: &str, format: &str, e: ImageError) -> Error {
    match e {
        ImageError::Limits(l) => Error::new(
            ErrorKind::TooLarge,
            format!("{what} is over a decoder limit: {l}"),
        ),
        ImageError::Unsupported(u) => Error::new(
            ErrorKind::Unsupported,
            format!("{what} uses an unsupported {format} feature: {u}"),
        ),
        ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => Error::new(
            ErrorKind::Corrupt,
            format!("{what} is a truncated {format} image"),
        ),
        other => Error::new(
            ErrorKind::Corrupt,
            format!("{what} is a corrupt {format} image: {other}"),
        ),
    }
}

/// PIL's `convert('RGB')`, with 16-bit samples reduced to their high byte.
fn to_rgb8(img: DynamicImage) -> RgbImage {
    let (width, height) = (img.width(), img.height());
    let n = width as usize * height as usize;
    let mut data = Vec::with_capacity(n * 3);
    match &img {
        DynamicImage::ImageRgb8(b) => data.extend_from_slice(b.as_raw()),
        DynamicImage::ImageRgba8(b) => b
            .as_raw()
            .chunks_exact(4)
            .for_each(|p| data.extend_from_slice(&p[..3])),
        DynamicImage::ImageLuma8(b) => b
            .as_raw()
            .iter()
            .for_each(|&v| data.extend_from_slice(&[v, v, v])),
        DynamicImage::ImageLumaA8(b) => b
            .as_raw()
            .chunks_exact(2)
            .for_each(|p| data.extend_from_slice(&[p[0]; 3])),
        DynamicImage::ImageRgb16(b) => data.extend(b.as_raw().iter().map(|&v| (v >> 8) as u8)),
        DynamicImage::ImageRgba16(b) => b
            .as_raw()
            .chunks_exact(4)
            .for_each(|p| data.extend(p[..3].iter().map(|&v| (v >> 8) as u8))),
        DynamicImage::ImageLuma16(b) => b
            .as_raw()
            .iter()
            .for_each(|&v| data.extend_from_slice(&[(v >> 8) as u8; 3])),
        DynamicImage::ImageLumaA16(b) => b
            .as_raw()
            .chunks_exact(2)
            .for_each(|p| data.extend_from_slice(&[(p[0] >> 8) as u8; 3])),
        // float and future variants: the image crate's own conversion (clamp, scale, round)
        other => data.extend_from_slice(other.to_rgb8().as_raw()),
    }
    RgbImage {
        width,
        height,
        data,
    }
}

fn decode_jpeg(bytes: &[u8], what: &str, limits: &Limits) -> Result<RgbImage> {
    use turbojpeg::{Colorspace, Decompressor, Image, PixelFormat};
    let corrupt = |e: turbojpeg::Error| {
        Error::new(
            ErrorKind::Corrupt,
            format!("{what} is a corrupt or truncated JPEG image: {e}"),
        )
    };
    let mut dec = Decompressor::new()
        .map_err(|e| Error::new(ErrorKind::Internal, format!("libjpeg-turbo: {e}")))?;
    let header = dec.read_header(bytes).map_err(corrupt)?;
    let (w, h) = (header.width, header.height);
    limits.check(what, w as u64, h as u64)?;
    if header.is_lossless {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("{what} is a lossless JPEG, which is not supported"),
        ));
    }
    let (w, h) = if limits.jpeg_draft_size > 0 {
        let min = limits.jpeg_draft_size as usize;
        let factor = [8, 4, 2]
            .into_iter()
            .map(|d| turbojpeg::ScalingFactor::new(1, d))
            .find(|f| f.scale(w) >= min && f.scale(h) >= min);
        match factor {
            Some(f) => {
                dec.set_scaling_factor(f).map_err(corrupt)?;
                (f.scale(w), f.scale(h))
            }
            None => (w, h),
        }
    } else {
        (w, h)
    };
    let format = match header.colorspace {
        Colorspace::Gray => PixelFormat::GRAY,
        Colorspace::CMYK | Colorspace::YCCK => PixelFormat::CMYK,
        _ => PixelFormat::RGB,
    };
    let mut out = Image {
        pixels: vec![0u8; w * h * format.size()],
        width: w,
        pitch: w * format.size(),
        height: h,
        format,
    };
    dec.decompress(bytes, out.as_deref_mut()).map_err(corrupt)?;
    let data = match format {
        PixelFormat::GRAY => out.pixels.iter().flat_map(|&v| [v, v, v]).collect(),
        PixelFormat::CMYK => out.pixels.chunks_exact(4).flat_map(cmyk_to_rgb).collect(),
        _ => out.pixels,
    };
    Ok(RgbImage {
        width: w as u32,
        height: h as u32,
        data,
    })
}

/// PIL: JPEG CMYK is read with inverted (Adobe) polarity, then `cmyk2rgb` in Convert.c:
/// `nk = 255 - k; out = clip8(nk - muldiv255(c, nk))`. With stored values s, c = 255 - s_c
/// and nk = s_k.
fn cmyk_to_rgb(stored: &[u8]) -> [u8; 3] {
    let nk = stored[3] as i32;
    let ch = |s: u8| {
        let c = 255 - s as i32;
        let t = c * nk + 128;
        let m = ((t >> 8) + t) >> 8;
        (nk - m).clamp(0, 255) as u8
    };
    [ch(stored[0]), ch(stored[1]), ch(stored[2])]
}
