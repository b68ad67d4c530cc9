//! HEVC (libx265) and VP9 (libvpx) through the host's FFmpeg libraries (the `ffmpeg`
//! cargo feature): an encoder of XRGB8888 frames and a decoder of the files it writes.
//!
//! HEVC goes out as an Annex-B stream (parameter sets in band with each key frame), VP9 in
//! an IVF file (a 32-byte file header, then a 12-byte header per frame), the simplest
//! containers FFmpeg's demuxers (and most players) read back. Both encoders run on one
//! thread in their low-latency modes: x265 `ultrafast` + `zerolatency`, libvpx realtime
//! at `cpu-used` 8 with no frame lag, so one frame in gives its packet out at once.
use ffmpeg_next as ff;

use super::{Codec, DecodedFrame};

/// Starts FFmpeg (once is enough; again is harmless), logging only its errors.
fn init() -> Result<(), String> {
    ff::init().map_err(|e| format!("cannot start FFmpeg: {e}"))?;
    ff::util::log::set_level(ff::util::log::Level::Error);
    Ok(())
}

/// The FFmpeg encoder behind `codec`, or why there is none.
fn encoder_of(codec: Codec) -> Result<ff::Codec, String> {
    init()?;
    let name = match codec {
        Codec::Hevc => "libx265",
        Codec::Vp9 => "libvpx-vp9",
        Codec::H264 => return Err("H.264 is openh264's, not FFmpeg's".into()),
    };
    ff::encoder::find_by_name(name)
        .ok_or_else(|| format!("this host's FFmpeg (libavcodec) has no {name} encoder"))
}

/// Whether this host's FFmpeg encodes `codec`; the error names what is missing.
pub fn available(codec: Codec) -> Result<(), String> {
    encoder_of(codec).map(drop)
}

/// Encodes XRGB8888 frames of one size (cut to even width and height).
pub struct FfEncoder {
    codec: Codec,
    encoder: ff::encoder::Video,
    scaler: ff::software::scaling::Context,
    src: ff::frame::Video,
    yuv: ff::frame::Video,
    packet: ff::Packet,
    width: u32,
    height: u32,
    fps: u32,
    pts: i64,
    key: bool,
}

// SAFETY: the FFmpeg contexts are used by one thread at a time (the session's encoder
// thread owns the encoder after it is made); FFmpeg allows a codec context to move between
// threads as long as no two use it at once.
unsafe impl Send for FfEncoder {}

impl FfEncoder {
    /// An encoder for `width` x `height` frames at `bitrate` bits a second and at most `fps`
    /// frames a second, on one thread.
    pub fn new(
        codec: Codec,
        width: u32,
        height: u32,
        bitrate: u64,
        fps: u32,
    ) -> Result<Self, String> {
        let found = encoder_of(codec)?;
        let (w, h) = (width & !1, height & !1);
        if w < 16 || h < 16 {
            return Err(format!("{width}x{height} is too small to encode"));
        }
        let setup = |e: ff::Error| format!("cannot set up the {codec} encoder: {e}");
        let mut video = ff::codec::context::Context::new_with_codec(found)
            .encoder()
            .video()
            .map_err(setup)?;
        video.set_width(w);
        video.set_height(h);
        video.set_format(ff::format::Pixel::YUV420P);
        video.set_time_base((1, fps as i32));
        video.set_frame_rate(Some((fps as i32, 1)));
        video.set_bit_rate(bitrate as usize);
        video.set_max_b_frames(0);
        video.set_gop(fps * 10);
        let mut opts = ff::Dictionary::new();
        match codec {
            Codec::Hevc => {
                opts.set("preset", "ultrafast");
                opts.set("tune", "zerolatency");
                // Parameter sets with every key frame, and a forced key frame an IDR: a
                // watcher that joins a running stream decodes from its first frame.
                opts.set(
                    "x265-params",
                    "log-level=error:pools=none:frame-threads=1:repeat-headers=1",
                );
                opts.set("forced-idr", "1");
            }
            _ => {
                opts.set("deadline", "realtime");
                opts.set("cpu-used", "8");
                opts.set("lag-in-frames", "0");
                opts.set("row-mt", "0");
                opts.set("threads", "1");
            }
        }
        let encoder = video.open_with(opts).map_err(setup)?;
        let scaler = ff::software::scaling::Context::get(
            ff::format::Pixel::BGRZ,
            w,
            h,
            ff::format::Pixel::YUV420P,
            w,
            h,
            ff::software::scaling::Flags::POINT,
        )
        .map_err(setup)?;
        Ok(Self {
            codec,
            encoder,
            scaler,
            src: ff::frame::Video::new(ff::format::Pixel::BGRZ, w, h),
            yuv: ff::frame::Video::empty(),
            packet: ff::Packet::empty(),
            width: w,
            height: h,
            fps,
            pts: 0,
            key: true,
        })
    }

    /// The size encoded (the frame's, cut to even numbers).
    pub fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    /// Makes the next frame a key frame.
    pub fn force_keyframe(&mut self) {
        self.key = true;
    }

    /// What a file of this codec starts with: VP9's IVF header (HEVC: nothing).
    pub fn file_header(&self) -> Vec<u8> {
        if self.codec != Codec::Vp9 {
            return Vec::new();
        }
        let mut h = Vec::with_capacity(32);
        h.extend_from_slice(b"DKIF");
        h.extend_from_slice(&0u16.to_le_bytes()); // version
        h.extend_from_slice(&32u16.to_le_bytes()); // header size
        h.extend_from_slice(b"VP90");
        h.extend_from_slice(&(self.width as u16).to_le_bytes());
        h.extend_from_slice(&(self.height as u16).to_le_bytes());
        h.extend_from_slice(&self.fps.to_le_bytes()); // time base: 1/fps
        h.extend_from_slice(&1u32.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes()); // frame count: not known ahead
        h.extend_from_slice(&0u32.to_le_bytes());
        h
    }

    /// Encodes one frame (`stride` bytes a line, at least the encoder's size) and appends
    /// what the encoder gives for it to `out` (VP9: with its IVF frame header).
    pub fn encode(&mut self, frame: &[u8], stride: usize, out: &mut Vec<u8>) -> Result<(), String> {
        let (w, h) = (self.width as usize, self.height as usize);
        if stride < w * 4 || frame.len() < stride * (h - 1) + w * 4 {
            return Err(format!(
                "a frame of {} bytes at {stride} bytes a line is smaller than {w}x{h}",
                frame.len()
            ));
        }
        let line = self.src.stride(0);
        let dst = self.src.data_mut(0);
        for y in 0..h {
            dst[y * line..y * line + w * 4].copy_from_slice(&frame[y * stride..y * stride + w * 4]);
        }
        let failed = |e: ff::Error| format!("{} encode failed: {e}", self.codec);
        self.scaler.run(&self.src, &mut self.yuv).map_err(failed)?;
        self.yuv.set_pts(Some(self.pts));
        self.yuv.set_kind(if std::mem::take(&mut self.key) {
            ff::picture::Type::I
        } else {
            ff::picture::Type::None
        });
        self.pts += 1;
        self.encoder.send_frame(&self.yuv).map_err(failed)?;
        while self.encoder.receive_packet(&mut self.packet).is_ok() {
            let data = self.packet.data().unwrap_or_default();
            if self.codec == Codec::Vp9 {
                out.extend_from_slice(&(data.len() as u32).to_le_bytes());
                out.extend_from_slice(&self.packet.pts().unwrap_or(0).to_le_bytes());
            }
            out.extend_from_slice(data);
        }
        Ok(())
    }
}

/// Decodes a file this module's encoder wrote (HEVC Annex-B or VP9 IVF) and calls `each`
/// with every picture; returns how many there were.
pub fn decode_file(
    path: &std::path::Path,
    mut each: impl FnMut(DecodedFrame),
) -> Result<usize, String> {
    init()?;
    let bad = |e: ff::Error| format!("{}: {e}", path.display());
    let mut input = ff::format::input(&path).map_err(bad)?;
    let stream = input
        .streams()
        .best(ff::media::Type::Video)
        .ok_or_else(|| format!("{} holds no video stream", path.display()))?;
    let index = stream.index();
    let mut decoder = ff::codec::context::Context::from_parameters(stream.parameters())
        .map_err(bad)?
        .decoder()
        .video()
        .map_err(bad)?;
    let mut n = 0;
    let mut frame = ff::frame::Video::empty();
    let mut rgb = ff::frame::Video::empty();
    let mut scaler: Option<(ff::software::scaling::Context, u32, u32)> = None;
    let mut drain = |decoder: &mut ff::decoder::Video| -> Result<(), String> {
        while decoder.receive_frame(&mut frame).is_ok() {
            let (w, h) = (frame.width(), frame.height());
            if scaler.as_ref().is_none_or(|s| (s.1, s.2) != (w, h)) {
                let s = ff::software::scaling::Context::get(
                    frame.format(),
                    w,
                    h,
                    ff::format::Pixel::RGB24,
                    w,
                    h,
                    ff::software::scaling::Flags::POINT,
                )
                .map_err(bad)?;
                scaler = Some((s, w, h));
            }
            let Some((s, _, _)) = scaler.as_mut() else {
                unreachable!("made above")
            };
            s.run(&frame, &mut rgb).map_err(bad)?;
            let (wu, hu) = (w as usize, h as usize);
            let plane = |f: &ff::frame::Video, i: usize, bytes: usize| -> Vec<u8> {
                let (data, line) = (f.data(i), f.stride(i));
                (0..hu)
                    .flat_map(|y| data[y * line..y * line + bytes].iter().copied())
                    .collect()
            };
            each(DecodedFrame {
                width: w,
                height: h,
                y: plane(&frame, 0, wu),
                rgb: plane(&rgb, 0, wu * 3),
            });
            n += 1;
        }
        Ok(())
    };
    for (s, packet) in input.packets() {
        if s.index() != index {
            continue;
        }
        decoder.send_packet(&packet).map_err(bad)?;
        drain(&mut decoder)?;
    }
    decoder.send_eof().map_err(bad)?;
    drain(&mut decoder)?;
    Ok(n)
}

/// The FFmpeg decoder of `codec`, or why there is none.
fn decoder_of(codec: Codec) -> Result<ff::Codec, String> {
    init()?;
    let id = match codec {
        Codec::Hevc => ff::codec::Id::HEVC,
        Codec::Vp9 => ff::codec::Id::VP9,
        Codec::H264 => return Err("H.264 is openh264's, not FFmpeg's".into()),
    };
    ff::decoder::find(id)
        .ok_or_else(|| format!("this host's FFmpeg (libavcodec) has no {codec} decoder"))
}

/// Whether this host's FFmpeg decodes `codec`; the error names what is missing.
pub fn decoder_available(codec: Codec) -> Result<(), String> {
    decoder_of(codec).map(drop)
}

/// Decodes HEVC access units or VP9 frames (without their IVF headers), one packet each,
/// on one thread: each picture comes out as soon as its packet is in.
pub struct FfDecoder {
    codec: Codec,
    decoder: ff::decoder::Video,
    frame: ff::frame::Video,
    rgb: ff::frame::Video,
    scaler: Option<(ff::software::scaling::Context, ff::format::Pixel, u32, u32)>,
}

// SAFETY: as for FfEncoder: the decoder is used by one thread at a time (the session's
// thread owns it after it is made).
unsafe impl Send for FfDecoder {}

impl FfDecoder {
    pub fn new(codec: Codec) -> Result<Self, String> {
        let found = decoder_of(codec)?;
        let mut context = ff::codec::context::Context::new_with_codec(found);
        // One thread: no frame threading, so no picture is held back.
        context.set_threading(ff::threading::Config::count(1));
        let decoder = context
            .decoder()
            .video()
            .map_err(|e| format!("cannot set up the {codec} decoder: {e}"))?;
        Ok(Self {
            codec,
            decoder,
            frame: ff::frame::Video::empty(),
            rgb: ff::frame::Video::empty(),
            scaler: None,
        })
    }

    /// Decodes one packet and calls `each` with every picture it completes.
    pub fn decode(
        &mut self,
        unit: &[u8],
        each: &mut dyn FnMut(DecodedFrame),
    ) -> Result<(), String> {
        let packet = ff::Packet::copy(unit);
        self.decoder
            .send_packet(&packet)
            .map_err(|e| e.to_string())?;
        self.drain(each)
    }

    /// The end of the stream: every picture the decoder still holds.
    pub fn finish(&mut self, each: &mut dyn FnMut(DecodedFrame)) -> Result<(), String> {
        self.decoder
            .send_eof()
            .map_err(|e| format!("the {} stream does not decode at its end: {e}", self.codec))?;
        self.drain(each)
    }

    fn drain(&mut self, each: &mut dyn FnMut(DecodedFrame)) -> Result<(), String> {
        while self.decoder.receive_frame(&mut self.frame).is_ok() {
            let (w, h, format) = (self.frame.width(), self.frame.height(), self.frame.format());
            if self
                .scaler
                .as_ref()
                .is_none_or(|s| (s.1, s.2, s.3) != (format, w, h))
            {
                let s = ff::software::scaling::Context::get(
                    format,
                    w,
                    h,
                    ff::format::Pixel::RGB24,
                    w,
                    h,
                    ff::software::scaling::Flags::POINT,
                )
                .map_err(|e| format!("cannot convert a {w}x{h} picture to RGB: {e}"))?;
                self.scaler = Some((s, format, w, h));
            }
            let Some((s, ..)) = self.scaler.as_mut() else {
                unreachable!("made above")
            };
            s.run(&self.frame, &mut self.rgb)
                .map_err(|e| format!("cannot convert a {w}x{h} picture to RGB: {e}"))?;
            let (wu, hu) = (w as usize, h as usize);
            let plane = |f: &ff::frame::Video, i: usize, bytes: usize| -> Vec<u8> {
                let (data, line) = (f.data(i), f.stride(i));
                (0..hu)
                    .flat_map(|y| data[y * line..y * line + bytes].iter().copied())
                    .collect()
            };
            each(DecodedFrame {
                width: w,
                height: h,
                y: plane(&self.frame, 0, wu),
                rgb: plane(&self.rgb, 0, wu * 3),
            });
        }
        Ok(())
    }
}
