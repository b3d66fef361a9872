//! Image bytes → packed RGB8, with the semantics of PIL's `Image.open(f).convert('RGB')`.
//!
//! * JPEG goes through libjpeg-turbo (the `turbojpeg` crate), the decoder PIL itself uses, with the
//!   same settings (accurate integer IDCT, fancy upsampling), so the pixels are PIL's bit for bit.
//!   Grayscale is replicated; CMYK/YCCK is read with Adobe polarity (as PIL always assumes) and
//!   converted with PIL's `cmyk2rgb` integer formula.
//!   libjpeg's warnings (junk before a marker, a data segment that ends early, a bad ICC marker)
//!   are not errors, as in PIL; a file that ends inside the image is (PIL: "truncated").
//! * GIF: the first frame as PIL's GifImagePlugin shows it (indices through the palette on a
//!   canvas of the transparent index; no palette: gray), through the `gif` crate.
//! * PNG, WebP, BMP, TIFF go through the `image` crate. Alpha is dropped, not
//!   composited (PIL's RGBA→RGB); palettes are expanded; gray is replicated. TIFF turns by its
//!   Orientation tag, as PIL's TIFF reader does; TIFFs the `image` crate refuses or trips on
//!   (1/2/4-bit gray, palette, separate planes) are read chunk by chunk with the `tiff` crate.
//! * A decoder panic is caught and reported as an unsupported layout (0A000), never internal.
//!   README's format table lists what is exact, what differs, and what is refused.
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
    // (a decoder that panics on a layout it does not handle, as the tiff crate's assertion on
    // tiled files with separate planes: refused as unsupported, never an internal error)
    // TIFFs with separate planes go straight to the chunk reader: the tiff crate's own path
    // trips an assertion on their edge tiles
    if format == ImageFormat::Tiff && tiff_short(bytes, 284).map(|e| e.1) == Some(2) {
        if let Ok(Ok(Some(img))) =
            std::panic::catch_unwind(|| decode_tiff_chunks(bytes, what, limits))
        {
            return Ok(img);
        }
    }
    let decoded = std::panic::catch_unwind(|| match format {
        ImageFormat::Gif => decode_gif(bytes, what, limits),
        _ => decode_with_image(bytes, what, limits, format, &fmt_name),
    });
    // TIFFs the image crate refuses or trips on (1, 2 and 4-bit gray, separate planes): chunk by
    // chunk through the tiff crate, as PIL's unpackers read them
    if format == ImageFormat::Tiff
        && matches!(
            &decoded,
            Err(_)
                | Ok(Err(Error {
                    kind: ErrorKind::Unsupported,
                    ..
                }))
        )
    {
        if let Ok(Ok(Some(img))) =
            std::panic::catch_unwind(|| decode_tiff_chunks(bytes, what, limits))
        {
            return Ok(img);
        }
    }
    decoded.unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("{what} uses a {fmt_name} layout that the decoder does not handle ({msg})"),
        ))
    })
}

/// A TIFF of 1, 2, 4 or 8-bit gray, or 8-bit RGB(A), chunky or planar, strips or tiles: read
/// chunk by chunk with the tiff crate. Samples below 8 bits scale as PIL's unpackers do (x255,
/// x85, x17); WhiteIsZero is inverted; the Orientation tag applies. `Ok(None)`: not such a TIFF.
fn decode_tiff_chunks(bytes: &[u8], what: &str, limits: &Limits) -> Result<Option<RgbImage>> {
    use tiff::decoder::{Decoder, DecodingResult};
    use tiff::tags::Tag;
    use tiff::ColorType;
    let corrupt = |e: tiff::TiffError| {
        Error::new(
            ErrorKind::Corrupt,
            format!("{what} is a corrupt TIFF image: {e}"),
        )
    };
    // a palette TIFF (PhotometricInterpretation 3), which the tiff crate does not take: read
    // its indices as gray (the tag patched to 1 in a copy) and map them through ColorMap
    let patched;
    let (bytes, palette) = match tiff_short(bytes, 262) {
        Some((at, 3)) => {
            let mut b = bytes.to_vec();
            let one = if bytes[0] == b'I' { [1, 0] } else { [0, 1] };
            b[at..at + 2].copy_from_slice(&one);
            patched = b;
            (&patched[..], true)
        }
        _ => (bytes, false),
    };
    let mut tl = tiff::decoder::Limits::default();
    tl.decoding_buffer_size = (limits.max_pixels as usize)
        .saturating_mul(4)
        .saturating_add(1 << 20);
    let Ok(d) = Decoder::new(Cursor::new(bytes)) else {
        return Ok(None);
    };
    let mut d = d.with_limits(tl);
    let (w, h) = d.dimensions().map_err(corrupt)?;
    limits.check(what, w as u64, h as u64)?;
    let colortype = d.colortype().map_err(corrupt)?;
    let (spp, bits) = match colortype {
        ColorType::Gray(b) if [1, 2, 4, 8].contains(&b) => (1usize, b as usize),
        ColorType::RGB(8) => (3, 8),
        ColorType::RGBA(8) => (4, 8),
        _ => return Ok(None),
    };
    let tag = |d: &mut Decoder<Cursor<&[u8]>>, t: Tag| -> Option<u32> {
        d.find_tag(t).ok().flatten().and_then(|v| v.into_u32().ok())
    };
    let planar = tag(&mut d, Tag::PlanarConfiguration) == Some(2);
    let white_is_zero =
        spp == 1 && !palette && tag(&mut d, Tag::PhotometricInterpretation) == Some(0);
    let orientation = tag(&mut d, Tag::Orientation);
    // a palette: 16-bit red, green and blue tables, of which PIL keeps the high byte
    let colormap = match palette && spp == 1 {
        true => {
            let map = d
                .find_tag(Tag::ColorMap)
                .ok()
                .flatten()
                .and_then(|v| v.into_u16_vec().ok())
                .filter(|m| m.len() >= 3 << bits)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::Corrupt,
                        format!("{what} is a corrupt TIFF image: its palette is missing or short"),
                    )
                })?;
            Some(map)
        }
        false => None,
    };
    let (cw, ch) = d.chunk_dimensions();
    let (w, h, cw, ch) = (
        w as usize,
        h as usize,
        cw.max(1) as usize,
        ch.max(1) as usize,
    );
    let (across, down) = (w.div_ceil(cw), h.div_ceil(ch));
    let (planes, in_chunk) = if planar { (spp, 1) } else { (1, spp) };
    let max = (1u32 << bits) - 1;
    let mut out = vec![0u8; w * h * spp];
    for plane in 0..planes {
        for cy in 0..down {
            for cx in 0..across {
                let index = (plane * across * down + cy * across + cx) as u32;
                let (dw, dh) = d.chunk_data_dimensions(index);
                let DecodingResult::U8(v) = d.read_chunk(index).map_err(corrupt)? else {
                    return Ok(None);
                };
                let row_bytes = (dw as usize * in_chunk * bits).div_ceil(8);
                for y in 0..(dh as usize).min(h - cy * ch) {
                    for x in 0..(dw as usize).min(w - cx * cw) {
                        for s in 0..in_chunk {
                            let bit = (x * in_chunk + s) * bits;
                            let byte = *v.get(y * row_bytes + bit / 8).unwrap_or(&0) as u32;
                            let raw = (byte >> (8 - bits - bit % 8)) & max;
                            // (a palette index stays an index, mapped below)
                            let mut val = if colormap.is_some() {
                                raw as u8
                            } else {
                                (raw * 255 / max) as u8
                            };
                            if white_is_zero {
                                val = 255 - val;
                            }
                            let px = (cy * ch + y) * w + cx * cw + x;
                            out[px * spp + plane + s] = val;
                        }
                    }
                }
            }
        }
    }
    let (w32, h32) = (w as u32, h as u32);
    let (out, spp) = match &colormap {
        Some(map) => {
            let n = 1usize << bits;
            let rgb = out
                .iter()
                .flat_map(|&i| {
                    let i = i as usize;
                    [map[i], map[n + i], map[2 * n + i]].map(|c| (c >> 8) as u8)
                })
                .collect();
            (rgb, 3)
        }
        None => (out, spp),
    };
    let mut img = match spp {
        1 => image::GrayImage::from_raw(w32, h32, out).map(DynamicImage::ImageLuma8),
        3 => image::RgbImage::from_raw(w32, h32, out).map(DynamicImage::ImageRgb8),
        _ => image::RgbaImage::from_raw(w32, h32, out).map(DynamicImage::ImageRgba8),
    }
    .ok_or_else(|| Error::new(ErrorKind::Internal, "TIFF buffer size"))?;
    if let Some(o) = orientation
        .and_then(|o| u8::try_from(o).ok())
        .and_then(image::metadata::Orientation::from_exif)
    {
        img.apply_orientation(o);
    }
    Ok(Some(to_rgb8(img)))
}

/// Where the first IFD of a classic TIFF keeps the SHORT value of `tag` (its byte offset), and
/// the value: PhotometricInterpretation (262), PlanarConfiguration (284).
fn tiff_short(b: &[u8], tag: u16) -> Option<(usize, u16)> {
    let le = match b.get(..4)? {
        [b'I', b'I', 42, 0] => true,
        [b'M', b'M', 0, 42] => false,
        _ => return None,
    };
    let u16_at = |at: usize| -> Option<u16> {
        let x: [u8; 2] = b.get(at..at + 2)?.try_into().ok()?;
        Some(if le {
            u16::from_le_bytes(x)
        } else {
            u16::from_be_bytes(x)
        })
    };
    let x: [u8; 4] = b.get(4..8)?.try_into().ok()?;
    let ifd = if le {
        u32::from_le_bytes(x)
    } else {
        u32::from_be_bytes(x)
    } as usize;
    let n = u16_at(ifd)? as usize;
    (0..n)
        .map(|i| ifd + 2 + 12 * i)
        .find(|&e| u16_at(e) == Some(tag) && u16_at(e + 2) == Some(3))
        .and_then(|e| Some((e + 8, u16_at(e + 8)?)))
}

/// PNG, WebP, BMP, TIFF through the `image` crate.
fn decode_with_image(
    bytes: &[u8],
    what: &str,
    limits: &Limits,
    format: ImageFormat,
    fmt_name: &str,
) -> Result<RgbImage> {
    let fmt_name = fmt_name.to_string();
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
    // PIL's TIFF reader turns the image as its Orientation tag says (its JPEG, PNG and WebP
    // readers do not look at EXIF orientation, and neither do we)
    let orientation = match format {
        ImageFormat::Tiff => decoder.orientation().ok(),
        _ => None,
    };
    let mut img =
        DynamicImage::from_decoder(decoder).map_err(|e| image_error(what, &fmt_name, e))?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
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

/// A GIF's first frame as PIL shows it (GifImagePlugin, frame 0): a canvas of the logical
/// screen's size (grown to hold the frame), filled with the frame's transparent index (else
/// index 0), the frame's indices drawn at its offset, transparent ones included; then each index
/// through the frame's palette (else the global one). Without any palette, PIL's mode "L": the
/// index is the gray value. Neither transparency nor disposal changes the first frame's colours.
fn decode_gif(bytes: &[u8], what: &str, limits: &Limits) -> Result<RgbImage> {
    let gif_error = |e: gif::DecodingError| match e {
        gif::DecodingError::MemoryLimit => Error::new(
            ErrorKind::TooLarge,
            format!("{what} is over a decoder limit: its frame needs too much memory"),
        ),
        gif::DecodingError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => Error::new(
            ErrorKind::Corrupt,
            format!("{what} is a truncated GIF image"),
        ),
        gif::DecodingError::UnexpectedEof => Error::new(
            ErrorKind::Corrupt,
            format!("{what} is a truncated GIF image"),
        ),
        other => Error::new(
            ErrorKind::Corrupt,
            format!("{what} is a corrupt GIF image: {other}"),
        ),
    };
    let mut options = gif::DecodeOptions::new();
    options.set_color_output(gif::ColorOutput::Indexed);
    options.check_frame_consistency(false);
    options.allow_unknown_blocks(true);
    let frame_limit = limits.max_pixels.saturating_add(1 << 20).max(1);
    options.set_memory_limit(gif::MemoryLimit::Bytes(
        std::num::NonZeroU64::new(frame_limit).unwrap_or(std::num::NonZeroU64::MIN),
    ));
    // no global colour table: PIL's mode "L" (the index is the gray value), which is what a
    // gray ramp as the global table gives; the gif crate wants a table for every frame
    let with_ramp;
    let bytes = if bytes.len() > 13 && bytes[10] & 0x80 == 0 {
        let mut b = Vec::with_capacity(bytes.len() + 768);
        b.extend_from_slice(&bytes[..10]);
        b.push(bytes[10] | 0x87);
        b.extend_from_slice(&bytes[11..13]);
        b.extend((0..=255u8).flat_map(|v| [v, v, v]));
        b.extend_from_slice(&bytes[13..]);
        with_ramp = b;
        &with_ramp[..]
    } else {
        bytes
    };
    let mut decoder = options.read_info(Cursor::new(bytes)).map_err(gif_error)?;
    let (sw, sh) = (decoder.width() as u64, decoder.height() as u64);
    let global = decoder.global_palette().map(|p| p.to_vec());
    let frame = decoder
        .read_next_frame()
        .map_err(gif_error)?
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Corrupt,
                format!("{what} is a GIF without any frame"),
            )
        })?;
    let (left, top) = (frame.left as u64, frame.top as u64);
    let (fw, fh) = (frame.width as u64, frame.height as u64);
    let (w, h) = (sw.max(left + fw), sh.max(top + fh));
    limits.check(what, w, h)?;
    if (frame.buffer.len() as u64) < fw * fh {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("{what} is a corrupt GIF image: its first frame is short of pixels"),
        ));
    }
    let (w, h) = (w as usize, h as usize);
    let mut canvas = vec![frame.transparent.unwrap_or(0); w * h];
    for y in 0..fh as usize {
        let row = &frame.buffer[y * fw as usize..(y + 1) * fw as usize];
        let at = (top as usize + y) * w + left as usize;
        canvas[at..at + fw as usize].copy_from_slice(row);
    }
    let palette = frame.palette.clone().or(global);
    let mut data = Vec::with_capacity(w * h * 3);
    match palette {
        Some(p) => {
            for &i in &canvas {
                let at = i as usize * 3;
                // (an index past the palette: black, as PIL's palette reads past its colours)
                data.extend_from_slice(p.get(at..at + 3).unwrap_or(&[0, 0, 0]));
            }
        }
        None => canvas
            .iter()
            .for_each(|&v| data.extend_from_slice(&[v, v, v])),
    }
    Ok(RgbImage {
        width: w as u32,
        height: h as u32,
        data,
    })
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
    use turbojpeg::raw;
    let corrupt = |e: String| {
        Error::new(
            ErrorKind::Corrupt,
            format!("{what} is a corrupt or truncated JPEG image: {e}"),
        )
    };
    // The file must end the image (an EOI after its last scan): libjpeg pads a truncated image
    // with gray, and reports it only as a warning (and only the first warning's text survives);
    // PIL stops with "image file is truncated".
    if !ends_its_image(bytes) {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!("{what} is a truncated JPEG image: it ends inside the image (no EOI marker)"),
        ));
    }
    let mut dec = tj::Decompressor::new()
        .ok_or_else(|| Error::new(ErrorKind::Internal, "libjpeg-turbo: out of memory"))?;
    // a progressive file of thousands of scans would hold a batch for minutes (libjpeg-turbo's
    // own tools stop at 500, as here)
    dec.set(raw::TJPARAM_TJPARAM_SCANLIMIT, 500)
        .map_err(corrupt)?;
    // libjpeg's warnings (extraneous bytes before a marker, a premature end of a data segment, a
    // bad ICC marker, an unknown JFIF revision) are not errors: PIL reads such files, and so do we
    dec.read_header(bytes).map_err(corrupt)?;
    let (w, h) = (
        dec.get(raw::TJPARAM_TJPARAM_JPEGWIDTH),
        dec.get(raw::TJPARAM_TJPARAM_JPEGHEIGHT),
    );
    if w <= 0 || h <= 0 {
        return Err(corrupt(format!("its header gives a size of {w}x{h}")));
    }
    let (w, h) = (w as usize, h as usize);
    limits.check(what, w as u64, h as u64)?;
    if dec.get(raw::TJPARAM_TJPARAM_LOSSLESS) != 0 {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("{what} is a lossless JPEG, which is not supported"),
        ));
    }
    let precision = dec.get(raw::TJPARAM_TJPARAM_PRECISION);
    if precision != 8 {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("{what} is a {precision}-bit JPEG; only 8-bit JPEG is supported"),
        ));
    }
    // (TJSCALED: ceil(dimension * num / denom))
    let scaled = |d: usize, denom: usize| d.div_ceil(denom);
    let (w, h) = if limits.jpeg_draft_size > 0 {
        let min = limits.jpeg_draft_size as usize;
        match [8, 4, 2]
            .into_iter()
            .find(|&d| scaled(w, d) >= min && scaled(h, d) >= min)
        {
            Some(d) => {
                dec.set_scaling_factor(1, d as i32).map_err(corrupt)?;
                (scaled(w, d), scaled(h, d))
            }
            None => (w, h),
        }
    } else {
        (w, h)
    };
    let colorspace = dec.get(raw::TJPARAM_TJPARAM_COLORSPACE);
    let (format, size) = match colorspace as raw::TJCS {
        raw::TJCS_TJCS_GRAY => (raw::TJPF_TJPF_GRAY, 1),
        raw::TJCS_TJCS_CMYK | raw::TJCS_TJCS_YCCK => (raw::TJPF_TJPF_CMYK, 4),
        _ => (raw::TJPF_TJPF_RGB, 3),
    };
    let mut pixels = vec![0u8; w * h * size];
    dec.decompress(bytes, &mut pixels, w, h, w * size, format)
        .map_err(corrupt)?;
    let data = match size {
        1 => pixels.iter().flat_map(|&v| [v, v, v]).collect(),
        4 => pixels.chunks_exact(4).flat_map(cmyk_to_rgb).collect(),
        _ => pixels,
    };
    Ok(RgbImage {
        width: w as u32,
        height: h as u32,
        data,
    })
}

/// Whether the image ends: walking the file's markers from the SOI as libjpeg does (segments
/// skipped by their length, entropy-coded data by its stuffing: `FF 00`, restart markers, fill
/// bytes; junk between markers skipped), an EOI comes before the data ends. What follows the
/// EOI (a motion photo's video, an MPO's next image, zeros) is not looked at.
fn ends_its_image(b: &[u8]) -> bool {
    let mut i = 2; // after the SOI
    loop {
        // the next marker: junk before it skipped (libjpeg warns), fill bytes too
        while i < b.len() && b[i] != 0xFF {
            i += 1;
        }
        while i < b.len() && b[i] == 0xFF {
            i += 1;
        }
        let Some(&m) = b.get(i) else {
            return false;
        };
        i += 1;
        match m {
            0xD9 => return true,
            0x00 | 0x01 | 0xD0..=0xD7 => {}
            _ => {
                let Some(len) = b
                    .get(i..i + 2)
                    .map(|l| u16::from_be_bytes([l[0], l[1]]) as usize)
                else {
                    return false;
                };
                i += len.max(2);
                if m == 0xDA {
                    // entropy-coded data up to the next marker that is not stuffing or a restart
                    loop {
                        while i < b.len() && b[i] != 0xFF {
                            i += 1;
                        }
                        let mut j = i;
                        while j < b.len() && b[j] == 0xFF {
                            j += 1;
                        }
                        match b.get(j) {
                            None => return false,
                            Some(0x00) | Some(0xD0..=0xD7) => i = j + 1,
                            Some(_) => break, // a marker: the outer loop reads it
                        }
                    }
                }
            }
        }
    }
}

/// libjpeg-turbo's TurboJPEG 3 API, called directly: the `turbojpeg` crate reports a warning
/// (TJERR_WARNING: libjpeg read the image, and says the data was damaged) as an error, and does
/// not say which it was. PIL ignores libjpeg's warnings, as libjpeg's own tools do.
mod tj {
    use std::ffi::{c_int, CStr};
    use turbojpeg::raw;

    pub struct Decompressor(raw::tjhandle);

    impl Decompressor {
        pub fn new() -> Option<Decompressor> {
            // SAFETY: tj3Init has no preconditions; a NULL handle is checked.
            let h = unsafe { raw::tj3Init(raw::TJINIT_TJINIT_DECOMPRESS as c_int) };
            (!h.is_null()).then_some(Decompressor(h))
        }

        /// A call's result: Ok when it succeeded or only warned, Err with libjpeg's message.
        fn check(&mut self, rc: c_int) -> Result<(), String> {
            if rc == 0 {
                return Ok(());
            }
            // SAFETY: the handle is valid until drop; the error string is owned by the handle
            // and copied before any other call.
            let (code, msg) = unsafe {
                (
                    raw::tj3GetErrorCode(self.0),
                    CStr::from_ptr(raw::tj3GetErrorStr(self.0))
                        .to_string_lossy()
                        .into_owned(),
                )
            };
            // (except the end of the data before the image's end: libjpeg pads the rest with
            // gray, PIL stops with "image file is truncated")
            if code == raw::TJERR_TJERR_WARNING as c_int
                && !msg.contains("Premature end of JPEG file")
            {
                Ok(())
            } else {
                Err(msg)
            }
        }

        pub fn read_header(&mut self, jpeg: &[u8]) -> Result<(), String> {
            // SAFETY: pointer and length describe `jpeg`, which outlives the call.
            let rc = unsafe {
                raw::tj3DecompressHeader(self.0, jpeg.as_ptr(), jpeg.len() as raw::size_t)
            };
            self.check(rc)
        }

        pub fn set(&mut self, param: raw::TJPARAM, value: c_int) -> Result<(), String> {
            // SAFETY: a valid handle and a parameter of the TJPARAM enum.
            let rc = unsafe { raw::tj3Set(self.0, param as c_int, value) };
            self.check(rc)
        }

        pub fn get(&mut self, param: raw::TJPARAM) -> c_int {
            // SAFETY: a valid handle and a parameter of the TJPARAM enum.
            unsafe { raw::tj3Get(self.0, param as c_int) }
        }

        pub fn set_scaling_factor(&mut self, num: c_int, denom: c_int) -> Result<(), String> {
            // SAFETY: a valid handle; libjpeg-turbo checks the factor.
            let rc =
                unsafe { raw::tj3SetScalingFactor(self.0, raw::tjscalingfactor { num, denom }) };
            self.check(rc)
        }

        /// Decompresses into `out`, `height` rows of `pitch` bytes in pixel format `format`; the
        /// caller sized `out` for the header's (scaled) size.
        pub fn decompress(
            &mut self,
            jpeg: &[u8],
            out: &mut [u8],
            width: usize,
            height: usize,
            pitch: usize,
            format: raw::TJPF,
        ) -> Result<(), String> {
            if out.len() < pitch * height || pitch < width {
                return Err("output buffer too small".into());
            }
            let (Ok(p), Ok(_), Ok(_)) = (
                c_int::try_from(pitch),
                c_int::try_from(width),
                c_int::try_from(height),
            ) else {
                return Err("image too large".into());
            };
            // SAFETY: `out` holds `height` rows of `pitch` bytes (checked above), and libjpeg-turbo
            // writes the scaled image's rows, whose size the caller computed as TJSCALED does.
            let rc = unsafe {
                raw::tj3Decompress8(
                    self.0,
                    jpeg.as_ptr(),
                    jpeg.len() as raw::size_t,
                    out.as_mut_ptr(),
                    p,
                    format as c_int,
                )
            };
            self.check(rc)
        }
    }

    impl Drop for Decompressor {
        fn drop(&mut self) {
            // SAFETY: the handle came from tj3Init and is destroyed once.
            unsafe { raw::tj3Destroy(self.0) }
        }
    }
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
