//! A Bochs-display-style PCI display (vendor 0x1234, device 0x1111, class 0x0380, as
//! QEMU's `bochs-display`): VRAM in BAR 0 (prefetchable memory) and a 4 KiB MMIO BAR 2
//! with the DISPI mode registers ([`dispi`]) at 0x500 and QEMU's extended registers at
//! 0x600 (their size, and the framebuffer's byte order: little endian only). There is no
//! EDID: its block at 0 reads as zeros.
//!
//! The VRAM is host memory of the device's own; the VMM maps it into the guest where BAR
//! 0 is while memory decoding is on ([`VramPlacer`]), so the guest draws with plain stores
//! and no exits. Accesses that do reach the device (no mapping there) are served from the
//! same memory. The display reads the mode and the pixels through a [`BochsHandle`].
pub mod dispi;

use std::sync::{Arc, Mutex, MutexGuard};

use ray_memory::{GuestMemory, MemoryLayout, OwnedMemory};
use serde::{Deserialize, Serialize};

use crate::pci::config::{BarMove, ConfigSpace, PciId};
use crate::pci::PciDevice;
use dispi::{Dispi, Effect, Limits, Mode};

pub const VENDOR: u16 = 0x1234;
pub const DEVICE: u16 = 0x1111;
/// The MMIO BAR's size and where its parts are.
pub const MMIO_BAR_BYTES: u64 = 4096;
pub const DISPI_OFFSET: u64 = 0x500;
pub const QEMU_EXT_OFFSET: u64 = 0x600;
/// QEMU's extended registers: their size, and the byte-order word.
const QEXT_SIZE: u32 = 8;
const QEXT_LITTLE_ENDIAN: u32 = 0x1e1e_1e1e;
const QEXT_BIG_ENDIAN: u32 = 0xbebe_bebe;
pub const VRAM_BAR: usize = 0;
pub const MMIO_BAR: usize = 2;

/// Puts the VRAM where the guest decodes BAR 0 (a KVM memory slot), or takes it away
/// (`None`: decoding off).
pub trait VramPlacer: Send {
    fn place(&mut self, at: Option<u64>);
}

/// What the device and its display share.
struct Shared {
    dispi: Mutex<Dispi>,
    vram: OwnedMemory,
    limits: Limits,
    /// Refusals logged so far (a guest may repeat a bad write without end).
    refusals: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn dispi(&self) -> MutexGuard<'_, Dispi> {
        self.dispi.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Logs a refused guest access: the first ten, then at powers of two.
    fn refuse(&self, why: &str) {
        let n = 1 + self
            .refusals
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n <= 10 || n.is_power_of_two() {
            tracing::warn!("bochs display: {why} ({n} refused accesses so far)");
        }
    }
}

/// The display's view of a Bochs device: its mode and its pixels.
#[derive(Clone)]
pub struct BochsHandle(Arc<Shared>);

impl BochsHandle {
    /// The mode in force, if the guest enabled one.
    pub fn mode(&self) -> Option<Mode> {
        self.0.dispi().mode(&self.0.limits)
    }

    /// Copies the picture of `mode` into `out` (`width * 4` bytes a line, `height`
    /// lines). False if it does not fit.
    pub fn read(&self, mode: &Mode, out: &mut [u8]) -> bool {
        let line = mode.width as usize * 4;
        if out.len() != line * mode.height as usize
            || mode.offset + mode.span() > self.0.limits.vram
        {
            return false;
        }
        out.chunks_mut(line).enumerate().all(|(y, row)| {
            let at = mode.offset + y as u64 * u64::from(mode.stride);
            self.0.vram.read(at, row).is_ok()
        })
    }

    /// VRAM bytes.
    pub fn vram_bytes(&self) -> u64 {
        self.0.limits.vram
    }

    /// The VRAM's host mapping (for the KVM memory slot): its address.
    pub fn vram_host_address(&self) -> u64 {
        self.0
            .vram
            .span(0, self.0.limits.vram)
            .map_or(0, |s| s.as_ptr() as u64)
    }

    /// Whether two handles are of the same device.
    pub fn same(&self, other: &BochsHandle) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// The device's share of a snapshot or migration: its configuration space, registers
/// and VRAM (pages holding anything but zeros).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BochsState {
    pub config: Vec<(u8, u8)>,
    pub dispi: Vec<u16>,
    /// Non-zero 4 KiB pages of VRAM: (page number, base64 of its bytes).
    pub vram_pages: Vec<(u32, String)>,
}

const PAGE: u64 = 4096;

/// The PCI function.
pub struct BochsDisplay {
    config: ConfigSpace,
    /// Before `shared`: dropped first, so that the VRAM is unmapped from the guest before
    /// its memory can go.
    placer: Box<dyn VramPlacer>,
    placed: Option<u64>,
    shared: Arc<Shared>,
}

impl BochsDisplay {
    /// A device with `limits.vram` bytes of VRAM (a power of two, at least 4 KiB), its
    /// BARs at `vram_bar` and `mmio_bar` (naturally aligned); `placer` maps the VRAM.
    pub fn new(
        limits: Limits,
        vram_bar: u32,
        mmio_bar: u32,
        placer: Box<dyn VramPlacer>,
    ) -> Result<Self, String> {
        if !limits.vram.is_power_of_two() || limits.vram < PAGE {
            return Err(format!(
                "VRAM of {} bytes is not a power of two of at least 4 KiB",
                limits.vram
            ));
        }
        let layout = MemoryLayout::new(&[(0, limits.vram)])
            .map_err(|e| format!("VRAM of {} bytes: {e}", limits.vram))?;
        let vram = OwnedMemory::zeroed(&layout)
            .map_err(|e| format!("cannot map {} bytes of VRAM: {e}", limits.vram))?;
        let mut config = ConfigSpace::new(PciId {
            vendor: VENDOR,
            device: DEVICE,
            class: [0x03, 0x80, 0x00],
            revision: 2,
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        });
        config.add_prefetchable_bar(VRAM_BAR, limits.vram, vram_bar);
        config.add_bar(MMIO_BAR, MMIO_BAR_BYTES, mmio_bar);
        Ok(Self {
            config,
            placer,
            placed: None,
            shared: Arc::new(Shared {
                dispi: Mutex::new(Dispi::default()),
                vram,
                limits,
                refusals: Default::default(),
            }),
        })
    }

    pub fn handle(&self) -> BochsHandle {
        BochsHandle(self.shared.clone())
    }

    /// Where the VRAM should be in the guest now: BAR 0 while memory decoding is on.
    fn placement(&self) -> Option<u64> {
        self.config
            .memory_enabled()
            .then(|| self.config.bar_address(VRAM_BAR))
            .flatten()
    }

    /// Maps the VRAM where it should be, if it is not there.
    fn follow_placement(&mut self) {
        let want = self.placement();
        if want != self.placed {
            self.placer.place(want);
            self.placed = want;
        }
    }

    fn read_mmio(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let s = &self.shared;
        match (offset, data.len()) {
            // No EDID: the block reads as zeros, which no guest takes for one.
            (0..DISPI_OFFSET, _) => {}
            (o, 2) if (DISPI_OFFSET..QEMU_EXT_OFFSET).contains(&o) && o.is_multiple_of(2) => {
                let index = ((o - DISPI_OFFSET) / 2) as u16;
                match s.dispi().read(index, &s.limits) {
                    Ok(v) => data.copy_from_slice(&v.to_le_bytes()),
                    Err(e) => s.refuse(&format!("read refused: {e}")),
                }
            }
            (QEMU_EXT_OFFSET, 4) => data.copy_from_slice(&QEXT_SIZE.to_le_bytes()),
            (o, 4) if o == QEMU_EXT_OFFSET + 4 => {
                data.copy_from_slice(&QEXT_LITTLE_ENDIAN.to_le_bytes())
            }
            (o, n) => s.refuse(&format!(
                "a {n}-byte read at {o:#x} of the MMIO BAR: no register there (DISPI \
                 registers are 16-bit at {DISPI_OFFSET:#x})"
            )),
        }
    }

    fn write_mmio(&mut self, offset: u64, data: &[u8]) {
        let s = self.shared.clone();
        match (offset, data) {
            (o, &[a, b]) if (DISPI_OFFSET..QEMU_EXT_OFFSET).contains(&o) && o.is_multiple_of(2) => {
                let index = ((o - DISPI_OFFSET) / 2) as u16;
                let value = u16::from_le_bytes([a, b]);
                let effect = s.dispi().write(index, value, &s.limits);
                match effect {
                    Ok(Effect::Enabled { clear }) => {
                        let mode = s.dispi().mode(&s.limits);
                        if let (true, Some(m)) = (clear, mode) {
                            if let Ok(span) = s.vram.span(m.offset, m.span()) {
                                span.fill(0);
                            }
                        }
                        if let Some(m) = mode {
                            tracing::info!(
                                "bochs display: mode {}x{} (stride {} bytes)",
                                m.width,
                                m.height,
                                m.stride
                            );
                        }
                    }
                    Ok(Effect::Disabled) => tracing::info!("bochs display: mode disabled"),
                    Ok(Effect::None | Effect::Moved) => {}
                    Err(e) => s.refuse(&e),
                }
            }
            (o, &[a, b, c, d]) if o == QEMU_EXT_OFFSET + 4 => {
                match u32::from_le_bytes([a, b, c, d]) {
                    QEXT_LITTLE_ENDIAN => {}
                    QEXT_BIG_ENDIAN => {
                        s.refuse("big-endian framebuffer refused: only little endian is shown")
                    }
                    v => s.refuse(&format!("byte-order word {v:#x} is neither order")),
                }
            }
            (o, d) => s.refuse(&format!(
                "a {}-byte write at {o:#x} of the MMIO BAR: no register there (DISPI \
                 registers are 16-bit at {DISPI_OFFSET:#x})",
                d.len()
            )),
        }
    }

    /// The state to save (the device must hold still: the vCPUs are paused).
    pub fn save(&self) -> BochsState {
        use base64::Engine as _;
        let s = &self.shared;
        let mut vram_pages = Vec::new();
        let mut page = vec![0u8; PAGE as usize];
        for n in 0..s.limits.vram / PAGE {
            if s.vram.known_zero(n * PAGE, PAGE) {
                continue;
            }
            if s.vram.read(n * PAGE, &mut page).is_ok() && !ray_memory::is_zero(&page) {
                vram_pages.push((
                    n as u32,
                    base64::engine::general_purpose::STANDARD.encode(&page),
                ));
            }
        }
        BochsState {
            config: self.config.guest_bytes(),
            dispi: s.dispi().saved(),
            vram_pages,
        }
    }

    /// Takes `state` over (untrusted: checked before anything changes) and maps the VRAM
    /// where the saved configuration decodes it.
    pub fn restore(&mut self, state: &BochsState) -> Result<(), String> {
        use base64::Engine as _;
        let s = self.shared.clone();
        let dispi = Dispi::from_saved(&state.dispi, &s.limits)?;
        let mut config = self.config.clone();
        config.restore_guest_bytes(&state.config)?;
        let mut pages: Vec<(u64, Vec<u8>)> = Vec::with_capacity(state.vram_pages.len());
        for (n, b64) in &state.vram_pages {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| format!("saved VRAM page {n}: {e}"))?;
            if bytes.len() as u64 != PAGE || u64::from(*n) >= s.limits.vram / PAGE {
                return Err(format!(
                    "saved VRAM page {n} ({} bytes) does not fit in {} bytes of VRAM",
                    bytes.len(),
                    s.limits.vram
                ));
            }
            pages.push((u64::from(*n) * PAGE, bytes));
        }
        for (at, bytes) in pages {
            s.vram
                .write(at, &bytes)
                .map_err(|e| format!("cannot restore VRAM: {e}"))?;
        }
        *s.dispi() = dispi;
        self.config = config;
        self.follow_placement();
        Ok(())
    }
}

impl PciDevice for BochsDisplay {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) -> Option<BarMove> {
        let moved = self.config.write(offset, data);
        self.follow_placement();
        moved
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match bar {
            // The VRAM without its memory slot (KVM refused it): served here, slowly.
            VRAM_BAR => {
                if self.shared.vram.read(offset, data).is_err() {
                    data.fill(0xff);
                }
            }
            MMIO_BAR => self.read_mmio(offset, data),
            _ => data.fill(0xff),
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match bar {
            VRAM_BAR => {
                let _ = self.shared.vram.write(offset, data);
            }
            MMIO_BAR => self.write_mmio(offset, data),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::dispi::*;
    use super::*;

    const LIMITS: Limits = Limits {
        min_width: 320,
        min_height: 200,
        max_width: 3840,
        max_height: 2160,
        vram: 32 << 20,
    };

    #[derive(Clone, Default)]
    struct Placements(Arc<Mutex<Vec<Option<u64>>>>);

    impl VramPlacer for Placements {
        fn place(&mut self, at: Option<u64>) {
            self.0.lock().unwrap().push(at);
        }
    }

    fn device() -> (BochsDisplay, Placements) {
        let p = Placements::default();
        let d = BochsDisplay::new(LIMITS, 0xc000_0000, 0xc200_0000, Box::new(p.clone())).unwrap();
        (d, p)
    }

    fn reg(d: &mut BochsDisplay, index: u16, value: u16) {
        d.write_bar(
            MMIO_BAR,
            DISPI_OFFSET + 2 * u64::from(index),
            &value.to_le_bytes(),
        );
    }

    fn get(d: &mut BochsDisplay, index: u16) -> u16 {
        let mut b = [0; 2];
        d.read_bar(MMIO_BAR, DISPI_OFFSET + 2 * u64::from(index), &mut b);
        u16::from_le_bytes(b)
    }

    #[test]
    fn identity_and_bars_are_a_bochs_display() {
        let (d, _) = device();
        let c = d.config();
        assert_eq!(c.u32_at(0), 0x1111_1234);
        assert_eq!(c.u32_at(0x08) >> 8, 0x03_80_00);
        assert_eq!(c.u32_at(0x10), 0xc000_0008, "VRAM: prefetchable memory");
        assert_eq!(c.bar_size(VRAM_BAR), 32 << 20);
        assert_eq!(c.u32_at(0x18), 0xc200_0000);
        assert_eq!(c.bar_size(MMIO_BAR), 4096);
    }

    #[test]
    fn the_vram_follows_memory_decoding_and_bar_moves() {
        let (mut d, p) = device();
        d.write_config(0x04, &2u16.to_le_bytes());
        d.write_config(0x10, &0xd000_0000u32.to_le_bytes());
        d.write_config(0x04, &0u16.to_le_bytes());
        // Config writes that change neither place nothing.
        d.write_config(0x3c, &[5]);
        assert_eq!(
            *p.0.lock().unwrap(),
            vec![Some(0xc000_0000), Some(0xd000_0000), None]
        );
    }

    #[test]
    fn mmio_registers_set_the_mode_the_display_reads() {
        let (mut d, _) = device();
        let h = d.handle();
        assert_eq!(get(&mut d, INDEX_ID), ID5);
        reg(&mut d, INDEX_BPP, 32);
        reg(&mut d, INDEX_XRES, 320);
        reg(&mut d, INDEX_YRES, 200);
        reg(&mut d, INDEX_ENABLE, ENABLED | LFB_ENABLED);
        let m = h.mode().unwrap();
        assert_eq!((m.width, m.height, m.stride), (320, 200, 1280));
        // Pixels written through BAR 0 (as without a memory slot) are what the display reads.
        d.write_bar(VRAM_BAR, 1280 + 4, &0x00ff_8040u32.to_le_bytes());
        let mut px = vec![0; 320 * 200 * 4];
        assert!(h.read(&m, &mut px));
        assert_eq!(&px[1284..1288], &0x00ff_8040u32.to_le_bytes());
        assert!(!h.read(&m, &mut px[4..]), "a short buffer is refused");
        let mut ext = [0; 4];
        d.read_bar(MMIO_BAR, QEMU_EXT_OFFSET + 4, &mut ext);
        assert_eq!(u32::from_le_bytes(ext), QEXT_LITTLE_ENDIAN);
    }

    #[test]
    fn bad_accesses_are_ignored_and_change_nothing() {
        let (mut d, _) = device();
        let h = d.handle();
        reg(&mut d, INDEX_BPP, 16);
        reg(&mut d, INDEX_XRES, 640);
        reg(&mut d, INDEX_YRES, 480);
        reg(&mut d, INDEX_ENABLE, ENABLED);
        assert_eq!(h.mode(), None, "16 bits per pixel: still off");
        assert_eq!(get(&mut d, INDEX_ENABLE) & ENABLED, 0);
        // Out-of-range indices, odd offsets, wrong sizes, a big-endian request.
        reg(&mut d, 12, 1);
        let mut b = [0xaa; 2];
        d.read_bar(MMIO_BAR, DISPI_OFFSET + 2 * 12, &mut b);
        assert_eq!(b, [0, 0]);
        d.write_bar(MMIO_BAR, DISPI_OFFSET + 1, &[1, 0]);
        d.write_bar(MMIO_BAR, DISPI_OFFSET + 2, &[1, 0, 0, 0]);
        d.write_bar(MMIO_BAR, DISPI_OFFSET + 2, &[1]);
        d.write_bar(
            MMIO_BAR,
            QEMU_EXT_OFFSET + 4,
            &QEXT_BIG_ENDIAN.to_le_bytes(),
        );
        d.write_bar(MMIO_BAR, 0xfff, &[1]);
        d.write_bar(VRAM_BAR, 64 << 20, &[1]);
        let mut far = [0; 4];
        d.read_bar(VRAM_BAR, 64 << 20, &mut far);
        assert_eq!(far, [0xff; 4]);
        assert_eq!(get(&mut d, INDEX_XRES), 640);
        assert_eq!(h.mode(), None);
        assert!(d.shared.refusals.load(std::sync::atomic::Ordering::Relaxed) >= 7);
    }

    #[test]
    fn state_survives_save_and_restore_and_bad_state_is_refused() {
        let (mut d, _) = device();
        d.write_config(0x04, &2u16.to_le_bytes());
        reg(&mut d, INDEX_BPP, 32);
        reg(&mut d, INDEX_XRES, 640);
        reg(&mut d, INDEX_YRES, 480);
        reg(&mut d, INDEX_ENABLE, ENABLED | LFB_ENABLED);
        d.write_bar(VRAM_BAR, 8192 + 12, &[1, 2, 3, 4]);
        let state = d.save();
        assert_eq!(state.vram_pages.len(), 1, "only pages holding something");
        let json = serde_json::to_string(&state).unwrap();
        let state: BochsState = serde_json::from_str(&json).unwrap();

        let (mut back, p) = device();
        back.restore(&state).unwrap();
        assert_eq!(*p.0.lock().unwrap(), vec![Some(0xc000_0000)]);
        let h = back.handle();
        let m = h.mode().unwrap();
        assert_eq!((m.width, m.height), (640, 480));
        let mut px = [0; 4];
        back.read_bar(VRAM_BAR, 8192 + 12, &mut px);
        assert_eq!(px, [1, 2, 3, 4]);

        let mut bad = state.clone();
        bad.vram_pages[0].0 = 1 << 20;
        let (mut other, _) = device();
        assert!(other
            .restore(&bad)
            .unwrap_err()
            .contains("does not fit in 33554432 bytes of VRAM"));
        let mut bad = state.clone();
        bad.dispi[usize::from(INDEX_BPP)] = 8;
        assert!(other.restore(&bad).is_err());
        assert_eq!(
            other.handle().mode(),
            None,
            "a refused state changes nothing"
        );
    }
}
