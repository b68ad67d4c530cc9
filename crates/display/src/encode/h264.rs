//! H.264 with openh264 (built from its bundled source, with nasm for its SIMD): an encoder
//! of XRGB8888 frames to an Annex-B byte stream and a decoder of such a stream back to
//! frames.
use openh264::decoder::{DecodedYUV, Decoder, DecoderConfig};
use openh264::encoder::{
    BitRate, Complexity, Encoder, EncoderConfig, FrameRate, QpRange, RateControlMode, UsageType,
};
use openh264::formats::{BgraSliceU8, YUVBuffer, YUVSource};
use openh264::OpenH264API;

/// Encodes XRGB8888 frames of one size (cut to even width and height: 4:2:0 needs them).
pub struct H264Encoder {
    encoder: Encoder,
    yuv: YUVBuffer,
    /// The frame packed to the encoded size when its lines are longer (stride or odd size).
    packed: Vec<u8>,
    width: usize,
    height: usize,
}

impl H264Encoder {
    /// An encoder for `width` x `height` frames at `bitrate` bits a second and at most
    /// `fps` frames a second, on one thread.
    pub fn new(width: u32, height: u32, bitrate: u64, fps: u32) -> Result<Self, String> {
        let (w, h) = ((width & !1) as usize, (height & !1) as usize);
        if w < 16 || h < 16 {
            return Err(format!("{width}x{height} is too small to encode"));
        }
        let config = EncoderConfig::new()
            .bitrate(BitRate::from_bps(bitrate.min(u64::from(u32::MAX)) as u32))
            .max_frame_rate(FrameRate::from_hz(fps as f32))
            .usage_type(UsageType::ScreenContentRealTime)
            .rate_control_mode(RateControlMode::Bitrate)
            .complexity(Complexity::Low)
            // The rate control may skip a frame (no output): the session offers it again.
            .skip_frames(true)
            .adaptive_quantization(false)
            .background_detection(false)
            .qp(QpRange::new(10, 36))
            .num_threads(1);
        let encoder = Encoder::with_api_config(OpenH264API::from_source(), config)
            .map_err(|e| format!("cannot set up the H.264 encoder: {e}"))?;
        Ok(Self {
            encoder,
            yuv: YUVBuffer::new(w, h),
            packed: Vec::new(),
            width: w,
            height: h,
        })
    }

    /// The size encoded (the frame's, cut to even numbers).
    pub fn size(&self) -> (u32, u32) {
        (self.width as u32, self.height as u32)
    }

    /// Makes the next frame an IDR frame (with SPS and PPS): where a new viewer starts.
    pub fn force_keyframe(&mut self) {
        self.encoder.force_intra_frame();
    }

    /// Encodes one frame (`stride` bytes a line, at least the encoder's size) and appends
    /// its access unit, start codes and all, to `out`; nothing when the rate control
    /// skipped the frame.
    pub fn encode(&mut self, frame: &[u8], stride: usize, out: &mut Vec<u8>) -> Result<(), String> {
        let (w, h) = (self.width, self.height);
        if stride < w * 4 || frame.len() < stride * (h - 1) + w * 4 {
            return Err(format!(
                "a frame of {} bytes at {stride} bytes a line is smaller than {w}x{h}",
                frame.len()
            ));
        }
        let pixels = if stride == w * 4 {
            &frame[..w * 4 * h]
        } else {
            self.packed.resize(w * 4 * h, 0);
            for y in 0..h {
                self.packed[y * w * 4..(y + 1) * w * 4]
                    .copy_from_slice(&frame[y * stride..y * stride + w * 4]);
            }
            &self.packed[..]
        };
        // XRGB8888 little-endian is B, G, R, X in memory.
        self.yuv.read_bgra8(BgraSliceU8::new(pixels, (w, h)));
        let stream = self
            .encoder
            .encode(&self.yuv)
            .map_err(|e| format!("H.264 encode failed: {e}"))?;
        stream.write_vec(out);
        Ok(())
    }
}

/// A decoded picture: its size, luma plane and RGB pixels.
pub struct DecodedFrame {
    pub width: u32,
    pub height: u32,
    /// Y, `width` bytes a line.
    pub y: Vec<u8>,
    /// RGB8, `width * 3` bytes a line.
    pub rgb: Vec<u8>,
}

/// Decodes an Annex-B H.264 stream frame by frame.
pub struct H264Decoder {
    decoder: Decoder,
}

impl H264Decoder {
    pub fn new() -> Result<Self, String> {
        let decoder = Decoder::with_api_config(OpenH264API::from_source(), DecoderConfig::new())
            .map_err(|e| format!("cannot set up the H.264 decoder: {e}"))?;
        Ok(Self { decoder })
    }

    /// Decodes `stream` (any number of access units) and calls `each` with every picture.
    pub fn decode(
        &mut self,
        stream: &[u8],
        mut each: impl FnMut(DecodedFrame),
    ) -> Result<usize, String> {
        let mut n = 0;
        for nal in openh264::nal_units(stream) {
            let picture = self
                .decoder
                .decode(nal)
                .map_err(|e| format!("the H.264 stream does not decode (NAL unit {n}): {e}"))?;
            if let Some(p) = picture {
                each(frame_of(&p));
                n += 1;
            }
        }
        // Pictures the decoder still holds.
        for p in self
            .decoder
            .flush_remaining()
            .map_err(|e| format!("the H.264 stream does not decode at its end: {e}"))?
        {
            each(frame_of(&p));
            n += 1;
        }
        Ok(n)
    }
}

pub(crate) fn frame_of(p: &DecodedYUV<'_>) -> DecodedFrame {
    let (w, h) = p.dimensions();
    let (ys, _, _) = p.strides();
    let mut y = Vec::with_capacity(w * h);
    for line in p.y().chunks(ys).take(h) {
        y.extend_from_slice(&line[..w]);
    }
    let mut rgb = vec![0; w * h * 3];
    p.write_rgb8(&mut rgb);
    DecodedFrame {
        width: w as u32,
        height: h as u32,
        y,
        rgb,
    }
}

/// The luma (BT.601, studio range, as the encoder converts) of an XRGB8888 pixel.
fn luma(px: u32) -> f64 {
    let (r, g, b) = (
        f64::from((px >> 16) & 0xff),
        f64::from((px >> 8) & 0xff),
        f64::from(px & 0xff),
    );
    0.2578125 * r + 0.50390625 * g + 0.09765625 * b + 16.0
}

/// The Y PSNR, in dB, of a decoded luma plane (`y`, `width` x `height`, packed) against
/// the XRGB8888 `frame` it came from (`stride` bytes a line); infinite when they agree.
pub fn y_psnr(frame: &[u8], stride: usize, y: &[u8], width: usize, height: usize) -> f64 {
    let mut sse = 0.0;
    for row in 0..height {
        for col in 0..width {
            let o = row * stride + col * 4;
            let px = u32::from_le_bytes([frame[o], frame[o + 1], frame[o + 2], frame[o + 3]]);
            let d = luma(px).floor() - f64::from(y[row * width + col]);
            sse += d * d;
        }
    }
    let mse = sse / (width * height) as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0 * 255.0 / mse).log10()
    }
}
