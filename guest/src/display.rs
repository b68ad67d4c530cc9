//! The displays the VMM gives us: linear XRGB8888 framebuffers in RAM, listed in the
//! display table whose address the heartbeat page holds (see `ray_guest_abi::display`),
//! then the scanouts of a virtio GPU ([`crate::virtio_gpu`]), numbered after them, then
//! a Bochs display device's VRAM ([`crate::bochs`]) in the mode we set on it.
//! Drawing on a framebuffer is plain stores to RAM: no exits at all; the VMM notices the
//! change itself. Drawing on a scanout stores into its backing, then sends the changed
//! rectangle (one batch of two requests, one kick).
//!
//! Shell: `displays` lists them; `draw PATTERN [SEED] [DISPLAY]` fills one (default 0)
//! with a test pattern the host can recompute (`ray_guest_abi::display::pattern_pixel`);
//! `scroll LINES [DISPLAY]` moves a framebuffer's picture up by LINES lines, as a text
//! console scrolls, and paints the lines that come in at the bottom.

use ray_guest_abi::display::{
    pattern_pixel, DisplayEntry, DisplayTable, Pattern, BYTES_PER_PIXEL, DISPLAY_TABLE_MAGIC,
    FORMAT_XRGB8888, MAX_DISPLAYS,
};

use crate::{bochs, heartbeat, paging, virtio_gpu};
use core::sync::atomic::Ordering::Relaxed;

/// The table, if the VMM announced one and it makes sense: each framebuffer XRGB8888 and
/// inside the identity map.
fn table() -> Option<DisplayTable> {
    let gpa = heartbeat::display_table().load(Relaxed);
    if gpa == 0 || !gpa.is_multiple_of(4096) || gpa + 4096 > paging::mapped_end() {
        return None;
    }
    // SAFETY: the page is identity-mapped (checked above) and the VMM wrote it before we
    // started; a volatile read of a plain-data struct.
    let t = unsafe { core::ptr::read_volatile(gpa as *const DisplayTable) };
    let sane = |d: &DisplayEntry| {
        d.format == FORMAT_XRGB8888
            && d.stride >= d.width * BYTES_PER_PIXEL
            && d.gpa
                .checked_add(u64::from(d.stride) * u64::from(d.height))
                .is_some_and(|end| end <= paging::mapped_end())
    };
    (t.magic == DISPLAY_TABLE_MAGIC
        && t.count as usize <= MAX_DISPLAYS
        && t.displays[..t.count as usize].iter().all(sane))
    .then_some(t)
}

/// Display `index`'s width and height, if there is such a display.
pub fn size(index: usize) -> Option<(u32, u32)> {
    let t = table()?;
    let d = t.displays[..t.count as usize].get(index)?;
    Some((d.width, d.height))
}

/// Display `index`'s pixels: `(address, stride, width, height, virtio scanout)`, for
/// drawing on it directly (a framebuffer, or a virtio scanout's backing).
pub fn surface(index: usize) -> Result<(u64, u32, u32, u32, Option<usize>), &'static str> {
    let count = table().map_or(0, |t| t.count as usize);
    if let Some(d) = table().and_then(|t| t.displays[..count].get(index).copied()) {
        return Ok((d.gpa, d.stride, d.width, d.height, None));
    }
    let virtio = virtio_gpu::get().map_or(0, |g| g.count);
    if index == count + virtio {
        let (at, stride, w, h) = bochs::surface().ok_or("no such display (or no mode set)")?;
        return Ok((at, stride, w, h, None));
    }
    let gpu = virtio_gpu::get().map_err(|_| "no such display")?;
    let k = index - count;
    if k >= gpu.count || gpu.scanouts[k].backing == 0 {
        return Err("no such display");
    }
    let s = gpu.scanouts[k];
    Ok((
        s.backing,
        s.width * BYTES_PER_PIXEL,
        s.width,
        s.height,
        Some(k),
    ))
}

/// `display N WxH stride=S at 0xADDR` per display (`... virtio scanout=K` for a virtio
/// GPU's), then `displays N`.
pub fn list() {
    let count = table().map_or(0, |t| {
        for (i, d) in t.displays[..t.count as usize].iter().enumerate() {
            println!(
                "display {i} {}x{} stride={} at {:#x}",
                d.width, d.height, d.stride, d.gpa
            );
        }
        t.count as usize
    });
    let mut virtio = 0;
    if let Ok(gpu) = virtio_gpu::get() {
        for (k, s) in gpu.scanouts[..gpu.count].iter().enumerate() {
            println!(
                "display {} {}x{} stride={} at {:#x} virtio scanout={k}",
                count + k,
                s.width,
                s.height,
                s.width * BYTES_PER_PIXEL,
                s.backing
            );
        }
        virtio = gpu.count;
    }
    let mut n = count + virtio;
    if let Some(d) = bochs::get() {
        match d.mode() {
            Some((at, stride, w, h)) => {
                println!("display {n} {w}x{h} stride={stride} at {at:#x} bochs")
            }
            None => println!("display {n} off bochs vram={:#x}", d.vram),
        }
        n += 1;
    }
    println!("displays {n}");
}

/// Draws `pattern` into virtio scanout `k`'s backing, then sends the rectangle that
/// changed: `draw ... changed=WxH+X+Y requests=N kicks=N` (`changed=none`: nothing sent).
fn draw_virtio(pattern: Pattern, seed: u32, index: usize, k: usize) {
    let gpu = match virtio_gpu::get() {
        Ok(g) if k < g.count => g,
        Ok(g) => {
            println!(
                "err draw: no display {index} (this VM has {})",
                index - k + g.count
            );
            return;
        }
        Err(e) => {
            println!("err draw: no display {index} ({e})");
            return;
        }
    };
    let s = gpu.scanouts[k];
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for y in 0..s.height {
        let line = (s.backing + u64::from(y) * u64::from(s.width) * 4) as *mut u32;
        for x in 0..s.width {
            let px = pattern_pixel(pattern, seed, x, y, s.width, s.height);
            // SAFETY: inside the scanout's backing, RAM the driver took for it alone
            // (width * height * 4 bytes in the identity map).
            let p = unsafe { line.add(x as usize) };
            // SAFETY: as above.
            if unsafe { p.read_volatile() } != px {
                // SAFETY: as above.
                unsafe { p.write_volatile(px) };
                (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1));
            }
        }
    }
    let (requests, kicks) = (gpu.requests, gpu.kicks());
    let changed = if x0 == u32::MAX {
        None
    } else {
        let r = virtio_gpu::Rect {
            x: x0,
            y: y0,
            width: x1 - x0,
            height: y1 - y0,
        };
        if let Err(e) = gpu.update(k, r) {
            println!("err draw: {e}");
            return;
        }
        Some(r)
    };
    let (sent, kicked) = (gpu.requests - requests, gpu.kicks() - kicks);
    let (name, w, h) = (pattern.name(), s.width, s.height);
    match changed {
        Some(r) => println!(
            "draw {name} seed={seed} display={index} {w}x{h} changed={}x{}+{}+{} requests={sent} kicks={kicked}",
            r.width, r.height, r.x, r.y
        ),
        None => println!(
            "draw {name} seed={seed} display={index} {w}x{h} changed=none requests={sent} kicks={kicked}"
        ),
    }
}

/// `draw PATTERN [SEED] [DISPLAY]`.
pub fn draw(mut args: core::str::SplitAsciiWhitespace) {
    let Some(name) = args.next() else {
        println!("err draw: missing pattern (bars, gradient, checker, fill)");
        return;
    };
    let Some(pattern) = Pattern::parse(name) else {
        println!("err draw: unknown pattern '{name}' (bars, gradient, checker, fill)");
        return;
    };
    let mut num = |what: &str| match args.next() {
        None => Some(0),
        Some(s) => {
            let n = crate::shell::parse_number(s).filter(|&n| n <= u64::from(u32::MAX));
            if n.is_none() {
                println!("err draw: bad {what} '{s}'");
            }
            n
        }
    };
    let Some(seed) = num("seed") else { return };
    let Some(index) = num("display") else { return };
    if let Some(extra) = args.next() {
        println!("err draw: unexpected argument '{extra}'");
        return;
    }
    let count = table().map_or(0, |t| t.count as usize);
    let index = index as usize;
    let virtio = virtio_gpu::get().map_or(0, |g| g.count);
    if index >= count && index == count + virtio && bochs::get().is_some() {
        return draw_bochs(pattern, seed as u32, index);
    }
    let Some(t) = table().filter(|_| index < count) else {
        return draw_virtio(pattern, seed as u32, index, index - count);
    };
    let d = &t.displays[index];
    for y in 0..d.height {
        let line = (d.gpa + u64::from(y) * u64::from(d.stride)) as *mut u32;
        for x in 0..d.width {
            let px = pattern_pixel(pattern, seed as u32, x, y, d.width, d.height);
            // SAFETY: inside the framebuffer, which `table` checked lies in the identity
            // map; RAM the VMM reserved for it, used by nothing else.
            unsafe { line.add(x as usize).write_volatile(px) };
        }
    }
    println!(
        "draw {} seed={seed} display={index} {}x{}",
        pattern.name(),
        d.width,
        d.height
    );
}

/// Draws `pattern` into the Bochs device's VRAM, in the mode set on it.
fn draw_bochs(pattern: Pattern, seed: u32, index: usize) {
    let Some((at, stride, w, h)) = bochs::surface() else {
        println!("err draw: display {index} (bochs) has no mode set: bochs mode W H first");
        return;
    };
    for y in 0..h {
        let line = (at + u64::from(y) * u64::from(stride)) as *mut u32;
        for x in 0..w {
            let px = pattern_pixel(pattern, seed, x, y, w, h);
            // SAFETY: inside the mode's picture, which `bochs::Device::mode` checked lies
            // in the device's VRAM (BAR 0, in the identity-mapped MMIO hole), memory that
            // only this driver draws in.
            unsafe { line.add(x as usize).write_volatile(px) };
        }
    }
    println!(
        "draw {} seed={seed} display={index} {w}x{h}",
        pattern.name()
    );
}

/// `rect X Y W H RGB [DISPLAY]`: fills a rectangle of emulated display DISPLAY (0 by
/// default) with colour RGB (0xRRGGBB), clipped to the display. Answers
/// `rect display=N WxH+X+Y` with what was filled.
pub fn rect(mut args: core::str::SplitAsciiWhitespace) {
    let mut v = [0u64; 6];
    for (i, what) in ["x", "y", "width", "height", "colour", "display"]
        .iter()
        .enumerate()
    {
        match args.next() {
            None if i == 5 => {}
            None => {
                println!("err rect: missing {what} (rect X Y W H RGB [DISPLAY])");
                return;
            }
            Some(s) => match crate::shell::parse_number(s).filter(|&n| n <= u64::from(u32::MAX)) {
                Some(n) => v[i] = n,
                None => {
                    println!("err rect: bad {what} '{s}'");
                    return;
                }
            },
        }
    }
    let [x, y, w, h, rgb, index] = v;
    let Some(t) = table().filter(|t| (index as usize) < t.count as usize) else {
        println!("err rect: no emulated display {index}");
        return;
    };
    let d = &t.displays[index as usize];
    let (x1, y1) = (
        (x + w).min(u64::from(d.width)),
        (y + h).min(u64::from(d.height)),
    );
    for row in y.min(y1)..y1 {
        let line = (d.gpa + row * u64::from(d.stride)) as *mut u32;
        for col in x.min(x1)..x1 {
            // SAFETY: inside the framebuffer (clipped above), which `table` checked lies in
            // the identity map; RAM the VMM reserved for it, used by nothing else.
            unsafe { line.add(col as usize).write_volatile(rgb as u32) };
        }
    }
    println!(
        "rect display={index} {}x{}+{x}+{y}",
        x1.saturating_sub(x),
        y1.saturating_sub(y)
    );
}

/// `scroll LINES [DISPLAY]`: framebuffer DISPLAY's lines move up by LINES (line y takes
/// line y + LINES); the LINES lines at the bottom get the checker pattern (seed LINES).
/// Answers `scroll LINES display=N WxH`.
pub fn scroll(mut args: core::str::SplitAsciiWhitespace) {
    let mut num = |what: &str| match args.next() {
        None => Some(0),
        Some(s) => {
            let n = crate::shell::parse_number(s).filter(|&n| n <= u64::from(u32::MAX));
            if n.is_none() {
                println!("err scroll: bad {what} '{s}'");
            }
            n
        }
    };
    let Some(lines) = num("line count") else {
        return;
    };
    let Some(index) = num("display") else { return };
    if let Some(extra) = args.next() {
        println!("err scroll: unexpected argument '{extra}'");
        return;
    }
    let Some(t) = table().filter(|t| (index as usize) < t.count as usize) else {
        println!("err scroll: no framebuffer display {index}");
        return;
    };
    let d = &t.displays[index as usize];
    let lines = lines as u32;
    if lines == 0 || lines >= d.height {
        println!(
            "err scroll: {lines} lines (1 to {} on this display)",
            d.height - 1
        );
        return;
    }
    let px = |x: u32, y: u32| {
        (d.gpa + u64::from(y) * u64::from(d.stride)) as *mut u32 as usize + x as usize * 4
    };
    for y in 0..d.height {
        for x in 0..d.width {
            let v = if y + lines < d.height {
                // SAFETY: inside the framebuffer, which `table` checked lies in the
                // identity map; RAM the VMM reserved for it, used by nothing else.
                unsafe { (px(x, y + lines) as *const u32).read_volatile() }
            } else {
                pattern_pixel(Pattern::Checker, lines, x, y, d.width, d.height)
            };
            // SAFETY: as above.
            unsafe { (px(x, y) as *mut u32).write_volatile(v) };
        }
    }
    println!("scroll {lines} display={index} {}x{}", d.width, d.height);
}
