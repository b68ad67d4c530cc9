//! Screenshots: a display's XRGB8888 pixels as an RGB PNG.

/// Encodes `pixels` (XRGB8888 little-endian, `stride` bytes a line) as a PNG.
pub fn encode(pixels: &[u8], width: u32, height: u32, stride: u32) -> Result<Vec<u8>, String> {
    let need = stride as usize * (height as usize).saturating_sub(1) + width as usize * 4;
    if stride < width * 4 || pixels.len() < need {
        return Err(format!(
            "{} bytes of pixels do not make a {width}x{height} picture of stride {stride}",
            pixels.len()
        ));
    }
    let mut rgb = Vec::with_capacity(width as usize * height as usize * 3);
    for line in pixels.chunks(stride as usize).take(height as usize) {
        for px in line[..width as usize * 4].chunks_exact(4) {
            rgb.extend_from_slice(&[px[2], px[1], px[0]]);
        }
    }
    let mut out = Vec::new();
    let mut enc = ::png::Encoder::new(&mut out, width, height);
    enc.set_color(::png::ColorType::Rgb);
    enc.set_depth(::png::BitDepth::Eight);
    enc.set_compression(::png::Compression::Fast);
    let mut w = enc.write_header().map_err(|e| e.to_string())?;
    w.write_image_data(&rgb).map_err(|e| e.to_string())?;
    w.finish().map_err(|e| e.to_string())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_png_decodes_to_the_same_pixels() {
        let (w, h) = (5u32, 3u32);
        let mut px = Vec::new();
        for i in 0..w * h {
            px.extend_from_slice(&[i as u8, 2 * i as u8, 3 * i as u8, 0xee]);
        }
        let bytes = encode(&px, w, h, w * 4).unwrap();
        let dec = ::png::Decoder::new(std::io::Cursor::new(bytes));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (w, h));
        assert_eq!(&buf[3 * 7..3 * 8], &[21, 14, 7]);
        assert!(encode(&px[..8], w, h, w * 4).is_err());
    }
}
