//! The displays the VMM gives us: linear XRGB8888 framebuffers in RAM, listed in the
//! display table whose address the heartbeat page holds (see `ray_guest_abi::display`).
//! Drawing is plain stores to RAM: no exits at all; the VMM notices the change itself.
//!
//! Shell: `displays` lists them; `draw PATTERN [SEED] [DISPLAY]` fills one (default 0)
//! with a test pattern the host can recompute (`ray_guest_abi::display::pattern_pixel`).

use ray_guest_abi::display::{
    pattern_pixel, DisplayEntry, DisplayTable, Pattern, BYTES_PER_PIXEL, DISPLAY_TABLE_MAGIC,
    FORMAT_XRGB8888, MAX_DISPLAYS,
};

use crate::{heartbeat, paging};
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

/// `display N WxH stride=S at 0xADDR` per display, then `displays N`.
pub fn list() {
    let Some(t) = table() else {
        println!("displays 0");
        return;
    };
    for (i, d) in t.displays[..t.count as usize].iter().enumerate() {
        println!(
            "display {i} {}x{} stride={} at {:#x}",
            d.width, d.height, d.stride, d.gpa
        );
    }
    println!("displays {}", t.count);
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
    let Some(t) = table() else {
        println!("err draw: this VM has no display");
        return;
    };
    let Some(d) = t.displays[..t.count as usize].get(index as usize) else {
        println!("err draw: no display {index} (this VM has {})", t.count);
        return;
    };
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
