//! RGB8 → one model input slot (CHW float32), as torchvision's `Resize` → `ToTensor` → `Normalize`.

use crate::decode::RgbImage;
use crate::resize::{resample, Filter};

/// How a model wants its pixels: resized to `size × size` with PIL's `filter`, then
/// `((v / divisor) - mean[c]) / std[c]`, computed in float32 in that order, as torchvision does
/// (`ToTensor` divides by 255, `Normalize` subtracts and divides). A "scale/offset" model such as
/// EfficientNet-Lite's `(x - 127) / 128` is `divisor 1, mean 127, std 128`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Preprocess {
    pub size: u32,
    pub filter: Filter,
    pub divisor: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Preprocess {
    /// The seed's ResNet50 preprocessing: 224×224, ToTensor, ImageNet mean/std.
    pub const IMAGENET: Preprocess = Preprocess {
        size: 224,
        filter: Filter::Bilinear,
        divisor: 255.0,
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };

    /// Floats in one input slot: 3 × size × size.
    pub fn slot_len(&self) -> usize {
        3 * self.size as usize * self.size as usize
    }

    /// Resizes `img` and writes it, normalized, planar (CHW), into `slot`.
    pub fn write_slot(&self, img: &RgbImage, slot: &mut [f32]) {
        self.normalize(&self.resize(img), slot);
    }

    /// `img` resized to `size × size` (packed RGB8), as PIL's `resize` with this filter.
    pub fn resize(&self, img: &RgbImage) -> Vec<u8> {
        resample(
            &img.data,
            img.width,
            img.height,
            3,
            self.size,
            self.size,
            self.filter,
        )
    }

    /// Normalizes `size × size` packed RGB8 pixels into `slot`, planar (CHW).
    pub fn normalize(&self, rgb: &[u8], slot: &mut [f32]) {
        let plane = self.size as usize * self.size as usize;
        assert_eq!(rgb.len(), 3 * plane, "image has the wrong size");
        assert_eq!(slot.len(), 3 * plane, "slot has the wrong length");
        let (s0, rest) = slot.split_at_mut(plane);
        let (s1, s2) = rest.split_at_mut(plane);
        let lut: [[f32; 256]; 3] = std::array::from_fn(|c| {
            std::array::from_fn(|v| (v as f32 / self.divisor - self.mean[c]) / self.std[c])
        });
        for (((p, a), b), c) in rgb.chunks_exact(3).zip(s0).zip(s1).zip(s2) {
            *a = lut[0][p[0] as usize];
            *b = lut[1][p[1] as usize];
            *c = lut[2][p[2] as usize];
        }
    }
}
