//! The text console: the shell's input (echoed) and output drawn on one display, an
//! emulated framebuffer or a virtio scanout, in the font and cell geometry of
//! `ray_guest_abi::text` (so the host can read a screenshot back into text).
//!
//! Shell: `console DISPLAY` turns it on (the display is cleared, the cursor at the top
//! left), `console off` turns it off (what it drew stays), `console` tells where it is.
//! Output goes on serial as always; the console is a second copy of it, and of what is
//! typed (from the serial port or the virtio keyboard). When the last row is full the
//! picture scrolls up by one row. On a framebuffer every change is plain stores to RAM;
//! on a virtio scanout the main loop sends the changed rows once per iteration
//! ([`flush`]: one batch of two requests, one kick).

use ray_guest_abi::text::{cell_pixel, grid, Cell, BG, CELL_H, CELL_W};

use crate::virtio::Shared;
use crate::{display, virtio_gpu};

/// The largest grid: a 3840x2160 display.
const MAX_COLS: usize = 3840 / CELL_W as usize;
const MAX_ROWS: usize = 2160 / CELL_H as usize;

/// Where the pixels are: a framebuffer (`stride` bytes a line) or virtio scanout `k`.
#[derive(Clone, Copy)]
struct Surface {
    base: u64,
    stride: u32,
    width: u32,
    height: u32,
    scanout: Option<usize>,
}

struct Console {
    surface: Option<Surface>,
    display: usize,
    cols: usize,
    rows: usize,
    col: usize,
    row: usize,
    cells: [u8; MAX_COLS * MAX_ROWS],
    /// Pixel rows changed since the last [`flush`] (virtio only): `[y0, y1)`.
    dirty: Option<(u32, u32)>,
    /// The last byte typed was a `\r` (a `\n` right after it is the same line end).
    after_cr: bool,
}

static CONSOLE: Shared<Console> = Shared::new(Console {
    surface: None,
    display: 0,
    cols: 0,
    rows: 0,
    col: 0,
    row: 0,
    cells: [b' '; MAX_COLS * MAX_ROWS],
    dirty: None,
    after_cr: false,
});

fn console() -> &'static mut Console {
    // SAFETY: only the boot CPU uses the console (the shell, its main loop and its serial
    // output, which other CPUs never reach: they print through `print_fmt_raw`), one call
    // at a time.
    unsafe { &mut *CONSOLE.0.get() }
}

impl Surface {
    fn put(&self, x: u32, y: u32, px: u32) {
        let p = self.base + u64::from(y) * u64::from(self.stride) + u64::from(x) * 4;
        // SAFETY: (x, y) is inside the display (callers stay in the grid, which fits it),
        // whose pixels lie in the identity map (checked by `display::surface`).
        unsafe { (p as *mut u32).write_volatile(px) };
    }

    /// Copies pixel line `from` over pixel line `to`.
    fn copy_line(&self, from: u32, to: u32) {
        let (src, dst) = (
            self.base + u64::from(from) * u64::from(self.stride),
            self.base + u64::from(to) * u64::from(self.stride),
        );
        for x in 0..u64::from(self.width) {
            // SAFETY: both lines are inside the display, as in `put`.
            unsafe {
                let v = ((src + x * 4) as *const u32).read_volatile();
                ((dst + x * 4) as *mut u32).write_volatile(v);
            }
        }
    }
}

impl Console {
    fn draw(&mut self, col: usize, row: usize, cell: Cell) {
        let Some(s) = self.surface else { return };
        let (x0, y0) = (col as u32 * CELL_W, row as u32 * CELL_H);
        for y in 0..CELL_H {
            for x in 0..CELL_W {
                s.put(x0 + x, y0 + y, cell_pixel(cell, x, y));
            }
        }
        self.touch(y0, y0 + CELL_H);
    }

    fn touch(&mut self, y0: u32, y1: u32) {
        self.dirty = Some(match self.dirty {
            Some((a, b)) => (a.min(y0), b.max(y1)),
            None => (y0, y1),
        });
    }

    fn cell(&self, col: usize, row: usize) -> Cell {
        Cell::Char(self.cells[row * self.cols + col])
    }

    fn set(&mut self, col: usize, row: usize, c: u8) {
        self.cells[row * self.cols + col] = c;
        self.draw(col, row, Cell::Char(c));
    }

    /// Moves the cursor: the cell it leaves shows its character again.
    fn move_to(&mut self, col: usize, row: usize) {
        let old = self.cell(self.col, self.row);
        self.draw(self.col, self.row, old);
        (self.col, self.row) = (col, row);
        self.draw(col, row, Cell::Cursor);
    }

    fn newline(&mut self) {
        if self.row + 1 < self.rows {
            return self.move_to(0, self.row + 1);
        }
        // Scroll: every row up by one, the last one blank.
        let old = self.cell(self.col, self.row);
        self.draw(self.col, self.row, old);
        let Some(s) = self.surface else { return };
        let cols = self.cols;
        self.cells.copy_within(cols..cols * self.rows, 0);
        let last = (self.rows - 1) * cols;
        self.cells[last..last + cols].fill(b' ');
        let height = self.rows as u32 * CELL_H;
        for y in CELL_H..height {
            s.copy_line(y, y - CELL_H);
        }
        for col in 0..cols {
            self.draw(col, self.rows - 1, Cell::Char(b' '));
        }
        self.touch(0, height);
        self.col = 0;
        self.draw(0, self.row, Cell::Cursor);
    }

    fn put(&mut self, b: u8) {
        match b {
            b'\n' => self.newline(),
            b'\r' => self.move_to(0, self.row),
            0x08 | 0x7f => {
                if self.col > 0 {
                    self.set(self.col - 1, self.row, b' ');
                    self.move_to(self.col - 1, self.row);
                }
            }
            _ => {
                let c = if (0x20..0x7f).contains(&b) { b } else { b'?' };
                self.set(self.col, self.row, c);
                if self.col + 1 < self.cols {
                    self.move_to(self.col + 1, self.row);
                } else {
                    self.newline();
                }
            }
        }
    }
}

/// A copy of serial output, when the console is on.
pub fn write(bytes: &[u8]) {
    let c = console();
    if c.surface.is_some() {
        for &b in bytes {
            c.put(b);
        }
    }
}

/// A byte typed to the shell, echoed when the console is on (a line end once).
pub fn echo(b: u8) {
    let c = console();
    if c.surface.is_none() {
        return;
    }
    let again = b == b'\n' && c.after_cr;
    c.after_cr = b == b'\r';
    match b {
        _ if again => {}
        b'\r' => c.put(b'\n'),
        _ => c.put(b),
    }
}

/// Sends what changed on a virtio scanout since the last call (the main loop calls this).
pub fn flush() {
    let c = console();
    let (Some(s), Some((y0, y1))) = (c.surface, c.dirty.take()) else {
        return;
    };
    let Some(k) = s.scanout else { return };
    let r = virtio_gpu::Rect {
        x: 0,
        y: y0,
        width: s.width,
        height: y1.min(s.height) - y0,
    };
    if let Ok(gpu) = virtio_gpu::get() {
        if let Err(e) = gpu.update(k, r) {
            // Not on the console itself: that would only grow what is to send.
            crate::serial::print_fmt_raw(format_args!("err console: {e}\n"));
        }
    }
}

/// `console [DISPLAY|off]`.
pub fn command(mut args: core::str::SplitAsciiWhitespace) {
    let arg = args.next();
    if let Some(extra) = args.next() {
        println!("err console: unexpected argument '{extra}'");
        return;
    }
    let c = console();
    match arg {
        None => match c.surface {
            Some(_) => println!(
                "console on display={} {}x{} at {},{}",
                c.display, c.cols, c.rows, c.col, c.row
            ),
            None => println!("console off"),
        },
        Some("off") => {
            flush();
            c.surface = None;
            println!("console off");
        }
        Some(s) => {
            let Some(index) = crate::shell::parse_number(s).filter(|&n| n < 64) else {
                println!("err console: bad display '{s}' (a number, or off)");
                return;
            };
            let index = index as usize;
            let (base, stride, width, height, scanout) = match display::surface(index) {
                Ok(s) => s,
                Err(e) => {
                    println!("err console: {e}");
                    return;
                }
            };
            let (cols, rows) = grid(width, height);
            let (cols, rows) = ((cols as usize).min(MAX_COLS), (rows as usize).min(MAX_ROWS));
            if cols == 0 || rows == 0 {
                println!("err console: display {index} is too small ({width}x{height})");
                return;
            }
            flush();
            let surface = Surface {
                base,
                stride,
                width,
                height,
                scanout,
            };
            for y in 0..height {
                for x in 0..width {
                    surface.put(x, y, BG);
                }
            }
            // Field by field: a whole new `Console` would be a large value on the stack.
            c.surface = Some(surface);
            c.display = index;
            (c.cols, c.rows, c.col, c.row) = (cols, rows, 0, 0);
            c.cells.fill(b' ');
            c.dirty = Some((0, height));
            c.after_cr = false;
            c.draw(0, 0, Cell::Cursor);
            println!("console on display={index} {cols}x{rows}");
            flush();
        }
    }
}
