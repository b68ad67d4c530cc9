//! The DISPI register file of a Bochs display: ten 16-bit registers that set the video
//! mode (the interface of the Bochs VBE extensions, which QEMU's `bochs-display` and
//! Linux's `bochs` DRM driver use through an MMIO BAR).
//!
//! The guest writes the resolution, depth and virtual width while the mode is disabled,
//! then sets ENABLE. The mode is checked only then, as a whole: a depth other than 32
//! bits, a size outside the limits or a picture that does not fit in VRAM leaves the
//! mode disabled (the write is refused with a reason, for the log). Every register reads
//! back what was last accepted into it.
use serde::{Deserialize, Serialize};

/// Register indices.
pub const INDEX_ID: u16 = 0;
pub const INDEX_XRES: u16 = 1;
pub const INDEX_YRES: u16 = 2;
pub const INDEX_BPP: u16 = 3;
pub const INDEX_ENABLE: u16 = 4;
pub const INDEX_BANK: u16 = 5;
pub const INDEX_VIRT_WIDTH: u16 = 6;
pub const INDEX_VIRT_HEIGHT: u16 = 7;
pub const INDEX_X_OFFSET: u16 = 8;
pub const INDEX_Y_OFFSET: u16 = 9;
/// How many registers hold state (indices 0..REGISTERS).
pub const REGISTERS: u16 = 10;
/// Read-only: VRAM in 64 KiB units (what Linux's driver checks against BAR 0's size).
pub const INDEX_VIDEO_MEMORY_64K: u16 = 10;

/// The interface versions a guest may ask for by writing ID; this device is the last.
pub const ID0: u16 = 0xb0c0;
pub const ID5: u16 = 0xb0c5;

/// ENABLE's bits.
pub const ENABLED: u16 = 0x01;
/// While set, XRES, YRES and BPP read the largest values the device takes.
pub const GETCAPS: u16 = 0x02;
pub const DAC_8BIT: u16 = 0x20;
pub const LFB_ENABLED: u16 = 0x40;
/// Enabling a mode without it clears the picture.
pub const NOCLEARMEM: u16 = 0x80;
const ENABLE_BITS: u16 = ENABLED | GETCAPS | DAC_8BIT | LFB_ENABLED | NOCLEARMEM;

/// The only depth this device shows: XRGB8888.
pub const BPP: u16 = 32;
const BYTES_PER_PIXEL: u64 = 4;
/// A bank's size (the banked window of VGA-era guests; with the LFB it is unused).
const BANK_BYTES: u64 = 64 << 10;

/// What the device takes: display sizes and its VRAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub min_width: u32,
    pub min_height: u32,
    pub max_width: u32,
    pub max_height: u32,
    /// VRAM bytes.
    pub vram: u64,
}

/// A mode in force: what the display shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mode {
    pub width: u32,
    pub height: u32,
    /// Bytes from one line to the next in VRAM (the virtual width's).
    pub stride: u32,
    /// Where the picture's first pixel is in VRAM (the X and Y offsets').
    pub offset: u64,
}

impl Mode {
    /// VRAM bytes from the first pixel's to just past the last's.
    pub fn span(&self) -> u64 {
        u64::from(self.height.saturating_sub(1)) * u64::from(self.stride)
            + u64::from(self.width) * 4
    }
}

/// What an accepted write did beyond storing the value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    None,
    /// A mode was enabled (`clear`: the guest did not ask to keep VRAM's contents).
    Enabled {
        clear: bool,
    },
    Disabled,
    /// The picture moved in VRAM (virtual width or offsets).
    Moved,
}

/// The registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dispi {
    regs: [u16; REGISTERS as usize],
}

impl Default for Dispi {
    fn default() -> Self {
        let mut regs = [0; REGISTERS as usize];
        regs[usize::from(INDEX_ID)] = ID5;
        Self { regs }
    }
}

impl Dispi {
    fn reg(&self, index: u16) -> u16 {
        self.regs[usize::from(index)]
    }

    fn enabled(&self) -> bool {
        self.reg(INDEX_ENABLE) & ENABLED != 0
    }

    /// Register `index`, or why there is none.
    pub fn read(&self, index: u16, limits: &Limits) -> Result<u16, String> {
        if index == INDEX_VIDEO_MEMORY_64K {
            return Ok(u16::try_from(limits.vram / BANK_BYTES).unwrap_or(u16::MAX));
        }
        if index >= REGISTERS {
            return Err(format!(
                "DISPI register {index} does not exist (0 to {INDEX_VIDEO_MEMORY_64K})"
            ));
        }
        if self.reg(INDEX_ENABLE) & GETCAPS != 0 {
            let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
            match index {
                INDEX_XRES => return Ok(clamp(limits.max_width)),
                INDEX_YRES => return Ok(clamp(limits.max_height)),
                INDEX_BPP => return Ok(BPP),
                _ => {}
            }
        }
        Ok(self.reg(index))
    }

    /// The guest writes `value` into register `index`. Checked before anything changes:
    /// a refusal (register unchanged, or for ENABLE the mode left disabled) says why.
    pub fn write(&mut self, index: u16, value: u16, limits: &Limits) -> Result<Effect, String> {
        match index {
            INDEX_ID => {
                if !(ID0..=ID5).contains(&value) {
                    return Err(format!(
                        "DISPI ID {value:#06x} is not an interface version ({ID0:#06x} to {ID5:#06x})"
                    ));
                }
                self.regs[usize::from(index)] = value;
                Ok(Effect::None)
            }
            INDEX_XRES | INDEX_YRES | INDEX_BPP if self.enabled() => Err(format!(
                "DISPI register {index} written ({value}) while a mode is enabled: disable it first"
            )),
            INDEX_XRES | INDEX_YRES | INDEX_BPP | INDEX_VIRT_HEIGHT => {
                // Checked as a whole when the mode is enabled.
                self.regs[usize::from(index)] = value;
                Ok(Effect::None)
            }
            INDEX_ENABLE => self.write_enable(value, limits),
            INDEX_VIDEO_MEMORY_64K => Err(format!(
                "DISPI register {index} (video memory size) is read-only: {value} not taken"
            )),
            INDEX_BANK => {
                let banks = limits.vram / BANK_BYTES;
                if u64::from(value) >= banks {
                    return Err(format!(
                        "DISPI bank {value} is outside VRAM ({banks} banks of 64 KiB)"
                    ));
                }
                self.regs[usize::from(index)] = value;
                Ok(Effect::None)
            }
            INDEX_VIRT_WIDTH | INDEX_X_OFFSET | INDEX_Y_OFFSET => {
                if !self.enabled() {
                    self.regs[usize::from(index)] = value;
                    return Ok(Effect::None);
                }
                let mut next = self.clone();
                next.regs[usize::from(index)] = value;
                next.check(limits)?;
                if index == INDEX_VIRT_WIDTH {
                    next.fit_virtual_height(limits);
                }
                *self = next;
                Ok(Effect::Moved)
            }
            _ => Err(format!(
                "DISPI register {index} does not exist (0 to {INDEX_VIDEO_MEMORY_64K})"
            )),
        }
    }

    fn write_enable(&mut self, value: u16, limits: &Limits) -> Result<Effect, String> {
        let value = value & ENABLE_BITS;
        if value & ENABLED == 0 {
            let was = self.enabled();
            self.regs[usize::from(INDEX_ENABLE)] = value;
            return Ok(if was { Effect::Disabled } else { Effect::None });
        }
        if self.enabled() {
            // Already on: only the other bits change.
            self.regs[usize::from(INDEX_ENABLE)] = value;
            return Ok(Effect::None);
        }
        let mut next = self.clone();
        // As on a VBE adapter: a new mode starts at the top left of VRAM, at least as
        // wide as the picture.
        next.regs[usize::from(INDEX_X_OFFSET)] = 0;
        next.regs[usize::from(INDEX_Y_OFFSET)] = 0;
        if next.reg(INDEX_VIRT_WIDTH) < next.reg(INDEX_XRES) {
            next.regs[usize::from(INDEX_VIRT_WIDTH)] = next.reg(INDEX_XRES);
        }
        next.regs[usize::from(INDEX_ENABLE)] = value;
        if let Err(e) = next.check(limits) {
            // The mode stays off; the other bits are kept as written.
            self.regs[usize::from(INDEX_ENABLE)] = value & !ENABLED;
            return Err(e);
        }
        next.fit_virtual_height(limits);
        *self = next;
        Ok(Effect::Enabled {
            clear: value & NOCLEARMEM == 0,
        })
    }

    /// VIRT_HEIGHT reads how many lines of the virtual width VRAM holds.
    fn fit_virtual_height(&mut self, limits: &Limits) {
        let stride = u64::from(self.reg(INDEX_VIRT_WIDTH)) * BYTES_PER_PIXEL;
        if let Some(lines) = limits.vram.checked_div(stride) {
            self.regs[usize::from(INDEX_VIRT_HEIGHT)] = u16::try_from(lines).unwrap_or(u16::MAX);
        }
    }

    /// The mode these registers describe, checked against `limits`.
    fn check(&self, limits: &Limits) -> Result<Mode, String> {
        let (w, h, bpp) = (
            u32::from(self.reg(INDEX_XRES)),
            u32::from(self.reg(INDEX_YRES)),
            self.reg(INDEX_BPP),
        );
        if bpp != BPP {
            return Err(format!(
                "DISPI mode {w}x{h} at {bpp} bits per pixel refused: only {BPP} is shown"
            ));
        }
        if !(limits.min_width..=limits.max_width).contains(&w) || !w.is_multiple_of(8) {
            return Err(format!(
                "DISPI width {w} refused: a multiple of 8 from {} to {}",
                limits.min_width, limits.max_width
            ));
        }
        if !(limits.min_height..=limits.max_height).contains(&h) {
            return Err(format!(
                "DISPI height {h} refused: {} to {}",
                limits.min_height, limits.max_height
            ));
        }
        let virt = u32::from(self.reg(INDEX_VIRT_WIDTH));
        let (x, y) = (
            u32::from(self.reg(INDEX_X_OFFSET)),
            u32::from(self.reg(INDEX_Y_OFFSET)),
        );
        if x + w > virt {
            return Err(format!(
                "DISPI picture {w} wide at x offset {x} does not fit in the virtual width {virt}"
            ));
        }
        let stride = u64::from(virt) * BYTES_PER_PIXEL;
        let mode = Mode {
            width: w,
            height: h,
            stride: virt * 4,
            offset: u64::from(y) * stride + u64::from(x) * BYTES_PER_PIXEL,
        };
        if mode.offset + mode.span() > limits.vram {
            return Err(format!(
                "DISPI mode {w}x{h} (virtual width {virt}, offset {x},{y}) needs {} bytes of \
                 VRAM; there are {}",
                mode.offset + mode.span(),
                limits.vram
            ));
        }
        Ok(mode)
    }

    /// The mode in force, if one is enabled.
    pub fn mode(&self, limits: &Limits) -> Option<Mode> {
        if !self.enabled() {
            return None;
        }
        self.check(limits).ok()
    }

    /// Registers from a saved state: untrusted, so an enabled mode must check out.
    pub fn from_saved(regs: &[u16], limits: &Limits) -> Result<Dispi, String> {
        let regs: [u16; REGISTERS as usize] = regs.try_into().map_err(|_| {
            format!(
                "the saved DISPI registers are {} values, not {REGISTERS}",
                regs.len()
            )
        })?;
        let d = Dispi { regs };
        if !(ID0..=ID5).contains(&d.reg(INDEX_ID)) {
            return Err(format!(
                "the saved DISPI ID {:#06x} is not an interface version",
                d.reg(INDEX_ID)
            ));
        }
        if d.enabled() {
            d.check(limits)
                .map_err(|e| format!("the saved DISPI mode is not one this device shows: {e}"))?;
        }
        Ok(d)
    }

    /// The registers, for saving.
    pub fn saved(&self) -> Vec<u16> {
        self.regs.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        min_width: 320,
        min_height: 200,
        max_width: 3840,
        max_height: 2160,
        vram: 32 << 20,
    };

    fn set(d: &mut Dispi, w: u16, h: u16, bpp: u16) -> Result<Effect, String> {
        d.write(INDEX_ENABLE, 0, &LIMITS)?;
        d.write(INDEX_BPP, bpp, &LIMITS)?;
        d.write(INDEX_XRES, w, &LIMITS)?;
        d.write(INDEX_YRES, h, &LIMITS)?;
        d.write(INDEX_ENABLE, ENABLED | LFB_ENABLED, &LIMITS)
    }

    #[test]
    fn a_mode_is_set_read_back_and_shown() {
        let mut d = Dispi::default();
        assert_eq!(d.read(INDEX_ID, &LIMITS).unwrap(), ID5);
        assert_eq!(d.mode(&LIMITS), None, "off until enabled");
        assert_eq!(
            set(&mut d, 640, 480, 32).unwrap(),
            Effect::Enabled { clear: true }
        );
        assert_eq!(
            d.mode(&LIMITS),
            Some(Mode {
                width: 640,
                height: 480,
                stride: 2560,
                offset: 0
            })
        );
        for (i, v) in [
            (INDEX_XRES, 640),
            (INDEX_YRES, 480),
            (INDEX_BPP, 32),
            (INDEX_ENABLE, ENABLED | LFB_ENABLED),
            (INDEX_VIRT_WIDTH, 640),
            (INDEX_VIRT_HEIGHT, ((32 << 20) / 2560) as u16),
            (INDEX_X_OFFSET, 0),
        ] {
            assert_eq!(d.read(i, &LIMITS).unwrap(), v, "register {i}");
        }
        // Panning inside VRAM moves the picture.
        assert_eq!(
            d.write(INDEX_Y_OFFSET, 480, &LIMITS).unwrap(),
            Effect::Moved
        );
        assert_eq!(d.mode(&LIMITS).unwrap().offset, 480 * 2560);
        assert_eq!(d.write(INDEX_ENABLE, 0, &LIMITS).unwrap(), Effect::Disabled);
        assert_eq!(d.mode(&LIMITS), None);
        // Enabling again starts at the top left; NOCLEARMEM keeps the picture.
        assert_eq!(
            d.write(INDEX_ENABLE, ENABLED | NOCLEARMEM, &LIMITS)
                .unwrap(),
            Effect::Enabled { clear: false }
        );
        assert_eq!(d.mode(&LIMITS).unwrap().offset, 0);
    }

    #[test]
    fn bad_modes_leave_the_display_off_and_say_why() {
        for (w, h, bpp, why) in [
            (640, 480, 16, "at 16 bits per pixel refused: only 32"),
            (640, 480, 8, "only 32 is shown"),
            (4096, 480, 32, "DISPI width 4096 refused"),
            (644, 480, 32, "DISPI width 644 refused: a multiple of 8"),
            (640, 4000, 32, "DISPI height 4000 refused"),
            (0, 0, 32, "DISPI width 0 refused"),
        ] {
            let mut d = Dispi::default();
            let e = set(&mut d, w, h, bpp).unwrap_err();
            assert!(e.contains(why), "{w}x{h}@{bpp}: {e}");
            assert_eq!(d.mode(&LIMITS), None);
            assert_eq!(d.read(INDEX_ENABLE, &LIMITS).unwrap() & ENABLED, 0);
            // What was written reads back, so the guest can see what it asked for.
            assert_eq!(d.read(INDEX_XRES, &LIMITS).unwrap(), w);
            assert_eq!(d.read(INDEX_BPP, &LIMITS).unwrap(), bpp);
        }
    }

    #[test]
    fn a_mode_that_does_not_fit_in_vram_is_refused() {
        let small = Limits {
            vram: 1 << 20,
            ..LIMITS
        };
        let mut d = Dispi::default();
        d.write(INDEX_BPP, 32, &small).unwrap();
        d.write(INDEX_XRES, 640, &small).unwrap();
        d.write(INDEX_YRES, 480, &small).unwrap();
        let e = d.write(INDEX_ENABLE, ENABLED, &small).unwrap_err();
        assert!(
            e.contains("needs 1228800 bytes of VRAM; there are 1048576"),
            "{e}"
        );
        assert_eq!(d.mode(&small), None);
        // Panning past the end of VRAM is refused and changes nothing.
        let mut d = Dispi::default();
        set(&mut d, 640, 480, 32).unwrap();
        let e = d.write(INDEX_Y_OFFSET, 60000, &LIMITS).unwrap_err();
        assert!(e.contains("needs"), "{e}");
        assert_eq!(d.read(INDEX_Y_OFFSET, &LIMITS).unwrap(), 0);
        let e = d.write(INDEX_VIRT_WIDTH, 320, &LIMITS).unwrap_err();
        assert!(e.contains("does not fit in the virtual width 320"), "{e}");
        assert_eq!(d.read(INDEX_VIRT_WIDTH, &LIMITS).unwrap(), 640);
        assert_eq!(d.mode(&LIMITS).unwrap().width, 640);
    }

    #[test]
    fn other_bad_writes_are_refused_without_effect() {
        let mut d = Dispi::default();
        set(&mut d, 800, 600, 32).unwrap();
        let before = d.clone();
        for (i, v, why) in [
            (10, 1, "DISPI register 10 (video memory size) is read-only"),
            (11, 1, "DISPI register 11 does not exist (0 to 10)"),
            (0xffff, 1, "DISPI register 65535 does not exist"),
            (INDEX_ID, 0x1234, "is not an interface version"),
            (INDEX_XRES, 1024, "while a mode is enabled"),
            (INDEX_BPP, 16, "while a mode is enabled"),
            (INDEX_BANK, 512, "DISPI bank 512 is outside VRAM (512 banks"),
        ] {
            let e = d.write(i, v, &LIMITS).unwrap_err();
            assert!(e.contains(why), "{i}={v}: {e}");
        }
        assert_eq!(d, before);
        assert!(d.read(11, &LIMITS).is_err());
        assert_eq!(d.read(INDEX_VIDEO_MEMORY_64K, &LIMITS).unwrap(), 512);
        assert_eq!(d.write(INDEX_ID, ID0, &LIMITS).unwrap(), Effect::None);
        assert_eq!(d.read(INDEX_ID, &LIMITS).unwrap(), ID0);
    }

    #[test]
    fn getcaps_reads_the_largest_mode() {
        let mut d = Dispi::default();
        d.write(INDEX_XRES, 640, &LIMITS).unwrap();
        d.write(INDEX_ENABLE, GETCAPS, &LIMITS).unwrap();
        assert_eq!(d.read(INDEX_XRES, &LIMITS).unwrap(), 3840);
        assert_eq!(d.read(INDEX_YRES, &LIMITS).unwrap(), 2160);
        assert_eq!(d.read(INDEX_BPP, &LIMITS).unwrap(), 32);
        d.write(INDEX_ENABLE, 0, &LIMITS).unwrap();
        assert_eq!(d.read(INDEX_XRES, &LIMITS).unwrap(), 640);
    }

    #[test]
    fn saved_registers_come_back_and_bad_ones_are_refused() {
        let mut d = Dispi::default();
        set(&mut d, 1024, 768, 32).unwrap();
        let back = Dispi::from_saved(&d.saved(), &LIMITS).unwrap();
        assert_eq!(back, d);
        assert!(Dispi::from_saved(&[0; 3], &LIMITS)
            .unwrap_err()
            .contains("3 values, not 10"));
        let mut bad = d.saved();
        bad[usize::from(INDEX_BPP)] = 24;
        assert!(Dispi::from_saved(&bad, &LIMITS)
            .unwrap_err()
            .contains("not one this device shows"));
        let mut bad = d.saved();
        bad[0] = 7;
        assert!(Dispi::from_saved(&bad, &LIMITS).is_err());
    }
}
