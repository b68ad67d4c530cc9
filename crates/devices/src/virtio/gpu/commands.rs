//! The 2D command set on host-side state: resources (host copies of the guest's images),
//! their backing (scatter lists in guest RAM), scanouts and the cursor.
//!
//! Every command is checked before it changes anything: a bad resource id, a size that
//! overflows or passes the per-GPU memory cap, a rectangle outside its resource, backing
//! outside guest RAM all get an error response and leave the state as it was. Pixels move
//! only inside a resource's own buffer and a scanout's own frame.
use std::collections::BTreeMap;

use ray_memory::GuestMemory;

use super::protocol::*;

/// Limits on what one guest can make the host hold for one GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Host bytes over all resources' pixels.
    pub host_bytes: u64,
    pub resources: usize,
    /// Entries of one resource's backing scatter list.
    pub backing_entries: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            host_bytes: 256 << 20,
            resources: 1024,
            backing_entries: 16384,
        }
    }
}

/// One 2D resource: the host copy of an image the guest keeps in its backing.
#[derive(Debug, Clone)]
pub struct Resource {
    pub format: Format,
    pub width: u32,
    pub height: u32,
    /// `width * height * 4` bytes in `format`.
    pub pixels: Vec<u8>,
    /// (guest-physical address, length) pieces, each inside guest RAM when attached.
    pub backing: Vec<(u64, u32)>,
}

impl Resource {
    fn stride(&self) -> usize {
        self.width as usize * BYTES_PER_PIXEL as usize
    }

    fn backing_len(&self) -> u64 {
        self.backing.iter().map(|&(_, l)| u64::from(l)).sum()
    }

    /// Where each backing entry starts in the backing's bytes.
    fn backing_starts(&self) -> Vec<u64> {
        self.backing
            .iter()
            .scan(0u64, |at, &(_, len)| {
                let start = *at;
                *at += u64::from(len);
                Some(start)
            })
            .collect()
    }

    /// Copies `out.len()` bytes at byte `offset` of the backing into `out`; `starts` is
    /// [`backing_starts`](Self::backing_starts), so that a long scatter list is searched,
    /// not walked, for every line.
    fn read_backing(
        backing: &[(u64, u32)],
        starts: &[u64],
        mem: &(dyn GuestMemory + Send + Sync),
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), String> {
        let first = starts.partition_point(|&s| s <= offset).saturating_sub(1);
        let mut offset = offset - starts.get(first).copied().unwrap_or(0);
        let mut done = 0;
        for &(addr, len) in &backing[first.min(backing.len())..] {
            let len = u64::from(len);
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = ((len - offset) as usize).min(out.len() - done);
            mem.read(addr + offset, &mut out[done..done + n])
                .map_err(|e| e.to_string())?;
            done += n;
            offset = 0;
            if done == out.len() {
                return Ok(());
            }
        }
        Err("the backing ends inside the transfer".into())
    }
}

/// What a scanout shows: a rectangle of a resource, and its frame (XRGB8888, the size of
/// the display's mode) as of the last flush.
#[derive(Debug, Clone, Default)]
pub struct Scanout {
    /// The display's mode (what GET_DISPLAY_INFO and GET_EDID report).
    pub width: u32,
    pub height: u32,
    /// 0: disabled.
    pub resource: u32,
    pub rect: Rect,
    pub frame: Vec<u8>,
    /// Flushes that reached this scanout (the VNC server's pictures change with them).
    pub flushes: u64,
}

impl Scanout {
    pub fn new(width: u32, height: u32) -> Self {
        Self {
            width,
            height,
            frame: vec![0; width as usize * height as usize * 4],
            ..Self::default()
        }
    }

    /// Copies `area` (in resource coordinates, inside the resource) of `res` into the
    /// frame, where the scanout's rectangle puts it; what falls outside the mode is
    /// dropped.
    fn show(&mut self, res: &Resource, area: Rect) -> Option<Rect> {
        let area = area.intersect(&self.rect);
        let (fx, fy) = (area.x - self.rect.x, area.y - self.rect.y);
        let visible = Rect {
            x: fx,
            y: fy,
            width: area.width,
            height: area.height,
        }
        .intersect(&Rect {
            x: 0,
            y: 0,
            width: self.width,
            height: self.height,
        });
        if visible.is_empty() {
            return None;
        }
        let w = visible.width as usize * 4;
        for row in 0..visible.height as usize {
            let (ry, rx) = (area.y as usize + row, area.x as usize);
            let src = ry * res.stride() + rx * 4;
            let dst = ((fy as usize + row) * self.width as usize + fx as usize) * 4;
            res.format
                .to_xrgb(&res.pixels[src..src + w], &mut self.frame[dst..dst + w]);
        }
        self.flushes += 1;
        Some(visible)
    }
}

/// The cursor as the guest last set it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    pub scanout: u32,
    pub x: u32,
    pub y: u32,
    /// 0: hidden.
    pub resource: u32,
    pub hot_x: u32,
    pub hot_y: u32,
}

/// An error response, with what was wrong for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: u32,
    pub why: String,
}

fn refuse<T>(code: u32, why: String) -> Result<T, Refusal> {
    Err(Refusal { code, why })
}

/// The whole host-side state of one GPU.
#[derive(Debug, Clone)]
pub struct Core {
    pub limits: Limits,
    pub resources: BTreeMap<u32, Resource>,
    pub host_bytes: u64,
    pub scanouts: Vec<Scanout>,
    pub cursor: Cursor,
    /// Config space: events the driver has not cleared yet.
    pub events_read: u32,
    /// A ledger keeps no pixels: what resources, backings, scanouts and the cursor are,
    /// checked as ever, while the pixels and frames live elsewhere (a remote GPU's back
    /// end). Transfers, scanout changes and flushes are checked and recorded only.
    pub ledger: bool,
    /// While set, the frame areas that changed (scanout, rectangle in the frame), for a
    /// back end to send.
    pub damage: Option<Vec<(usize, Rect)>>,
}

impl Core {
    pub fn new(modes: &[(u32, u32)], limits: Limits) -> Self {
        Self {
            limits,
            resources: BTreeMap::new(),
            host_bytes: 0,
            scanouts: modes.iter().map(|&(w, h)| Scanout::new(w, h)).collect(),
            cursor: Cursor::default(),
            events_read: 0,
            ledger: false,
            damage: None,
        }
    }

    /// A ledger (see [`Core::ledger`]) for scanouts of `modes`.
    pub fn new_ledger(modes: &[(u32, u32)], limits: Limits) -> Self {
        Self {
            ledger: true,
            ..Self::new(modes, limits)
        }
    }

    /// Back to the state after power-on (device reset): no resources, scanouts dark.
    pub fn reset(&mut self) {
        let modes: Vec<_> = self.scanouts.iter().map(|s| (s.width, s.height)).collect();
        let (ledger, damage) = (self.ledger, self.damage.take().map(|_| Vec::new()));
        *self = Self::new(&modes, self.limits);
        self.ledger = ledger;
        self.damage = damage;
    }

    pub fn resource(&self, id: u32) -> Result<&Resource, Refusal> {
        Self::lookup(&self.resources, id)
    }

    /// Resource `id` of `resources` (a field borrow, so that scanouts can change meanwhile).
    fn lookup(resources: &BTreeMap<u32, Resource>, id: u32) -> Result<&Resource, Refusal> {
        match resources.get(&id) {
            Some(r) => Ok(r),
            None => refuse(
                RESP_ERR_INVALID_RESOURCE_ID,
                format!("resource {id} does not exist"),
            ),
        }
    }

    fn scanout_index(&self, id: u32) -> Result<usize, Refusal> {
        let n = self.scanouts.len();
        if (id as usize) < n {
            Ok(id as usize)
        } else {
            refuse(
                RESP_ERR_INVALID_SCANOUT_ID,
                format!("scanout {id} does not exist: this GPU has {n}"),
            )
        }
    }

    /// Serves one control-queue command (`req` is its device-readable bytes); returns the
    /// response body after the header and its type.
    pub fn command(
        &mut self,
        hdr: &Header,
        req: &[u8],
        mem: &(dyn GuestMemory + Send + Sync),
    ) -> Result<(u32, Vec<u8>), Refusal> {
        let mut r = Reader::new(&req[HDR_LEN.min(req.len())..]);
        let short = || Refusal {
            code: RESP_ERR_INVALID_PARAMETER,
            why: format!(
                "command {:#x} is {} bytes, too short for its fields",
                hdr.kind,
                req.len()
            ),
        };
        match hdr.kind {
            CMD_GET_DISPLAY_INFO => Ok((RESP_OK_DISPLAY_INFO, self.display_info())),
            CMD_GET_EDID => {
                let id = self.scanout_index(r.u32().ok_or_else(short)?)?;
                let s = &self.scanouts[id];
                let mut body = Vec::with_capacity(8 + EDID_FIELD);
                body.extend_from_slice(&128u32.to_le_bytes());
                body.extend_from_slice(&0u32.to_le_bytes());
                body.extend_from_slice(&edid(s.width, s.height));
                body.resize(8 + EDID_FIELD, 0);
                Ok((RESP_OK_EDID, body))
            }
            CMD_RESOURCE_CREATE_2D => {
                let (id, format, w, h) =
                    (|| Some((r.u32()?, r.u32()?, r.u32()?, r.u32()?)))().ok_or_else(short)?;
                self.create_2d(id, format, w, h).map(|()| ok())
            }
            CMD_RESOURCE_UNREF => {
                let id = r.u32().ok_or_else(short)?;
                self.resource(id)?;
                self.forget(id);
                for s in self.scanouts.iter_mut().filter(|s| s.resource == id) {
                    s.resource = 0;
                }
                if self.cursor.resource == id {
                    self.cursor.resource = 0;
                }
                Ok(ok())
            }
            CMD_SET_SCANOUT => {
                let (rect, scanout, id) =
                    (|| Some((r.rect()?, r.u32()?, r.u32()?)))().ok_or_else(short)?;
                self.set_scanout(scanout, id, rect).map(|()| ok())
            }
            CMD_RESOURCE_FLUSH => {
                let (rect, id) = (|| Some((r.rect()?, r.u32()?)))().ok_or_else(short)?;
                self.flush(id, rect).map(|()| ok())
            }
            CMD_TRANSFER_TO_HOST_2D => {
                let (rect, offset, id) =
                    (|| Some((r.rect()?, r.u64()?, r.u32()?)))().ok_or_else(short)?;
                self.transfer(id, rect, offset, mem).map(|()| ok())
            }
            CMD_RESOURCE_ATTACH_BACKING => {
                let (id, n) = (|| Some((r.u32()?, r.u32()?)))().ok_or_else(short)?;
                self.attach_backing(id, n, &mut r, mem).map(|()| ok())
            }
            CMD_RESOURCE_DETACH_BACKING => {
                let id = r.u32().ok_or_else(short)?;
                self.resource(id)?;
                if let Some(res) = self.resources.get_mut(&id) {
                    res.backing.clear();
                }
                Ok(ok())
            }
            other => refuse(
                RESP_ERR_UNSPEC,
                format!("command {other:#x} is not part of the 2D command set"),
            ),
        }
    }

    /// Serves one cursor-queue command. The cursor is not drawn into the frames (a viewer
    /// draws its own); its position and image are state.
    pub fn cursor_command(&mut self, hdr: &Header, req: &[u8]) -> Result<(), Refusal> {
        let mut r = Reader::new(&req[HDR_LEN.min(req.len())..]);
        let fields = (|| {
            Some([
                r.u32()?,
                r.u32()?,
                r.u32()?,
                r.u32()?,
                r.u32()?,
                r.u32()?,
                r.u32()?,
            ])
        })();
        let Some(fields) = fields else {
            return refuse(
                RESP_ERR_INVALID_PARAMETER,
                format!("cursor command of {} bytes is too short", req.len()),
            );
        };
        self.cursor_fields(hdr.kind, fields)
    }

    /// A cursor command's fields: scanout, x, y, padding, resource, hot spot x and y.
    pub fn cursor_fields(&mut self, kind: u32, fields: [u32; 7]) -> Result<(), Refusal> {
        let [scanout, x, y, _, resource, hot_x, hot_y] = fields;
        self.scanout_index(scanout)?;
        match kind {
            CMD_MOVE_CURSOR => {
                self.cursor.scanout = scanout;
                self.cursor.x = x;
                self.cursor.y = y;
            }
            CMD_UPDATE_CURSOR => {
                if resource != 0 {
                    let res = self.resource(resource)?;
                    if hot_x >= res.width || hot_y >= res.height {
                        return refuse(
                            RESP_ERR_INVALID_PARAMETER,
                            format!(
                                "cursor hot spot {hot_x},{hot_y} is outside resource {resource} ({}x{})",
                                res.width, res.height
                            ),
                        );
                    }
                }
                self.cursor = Cursor {
                    scanout,
                    x,
                    y,
                    resource,
                    hot_x,
                    hot_y,
                };
            }
            other => {
                return refuse(
                    RESP_ERR_UNSPEC,
                    format!("command {other:#x} does not belong on the cursor queue"),
                )
            }
        }
        Ok(())
    }

    fn display_info(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(MAX_SCANOUTS * 24);
        for i in 0..MAX_SCANOUTS {
            let (w, h, on) = self
                .scanouts
                .get(i)
                .map_or((0, 0, 0u32), |s| (s.width, s.height, 1));
            for v in [0, 0, w, h, on, 0] {
                body.extend_from_slice(&v.to_le_bytes());
            }
        }
        body
    }

    pub fn create_2d(&mut self, id: u32, format: u32, w: u32, h: u32) -> Result<(), Refusal> {
        if id == 0 || self.resources.contains_key(&id) {
            return refuse(
                RESP_ERR_INVALID_RESOURCE_ID,
                format!("resource id {id} is 0 or in use"),
            );
        }
        let Some(format) = Format::from_wire(format) else {
            return refuse(
                RESP_ERR_INVALID_PARAMETER,
                format!("pixel format {format} is not a 2D format this device knows"),
            );
        };
        // At most 2^66: u128 cannot overflow.
        let bytes = u128::from(w) * u128::from(h) * u128::from(BYTES_PER_PIXEL);
        if w == 0 || h == 0 {
            return refuse(
                RESP_ERR_INVALID_PARAMETER,
                format!("resource {id} would be {w}x{h}: empty"),
            );
        }
        if self.resources.len() >= self.limits.resources {
            return refuse(
                RESP_ERR_OUT_OF_MEMORY,
                format!(
                    "the GPU holds {} resources already, its limit",
                    self.resources.len()
                ),
            );
        }
        let room = self.limits.host_bytes.saturating_sub(self.host_bytes);
        let Some(bytes) = u64::try_from(bytes).ok().filter(|&b| b <= room) else {
            return refuse(
                RESP_ERR_OUT_OF_MEMORY,
                format!(
                    "resource {id} ({w}x{h}, {bytes} bytes) would pass the GPU's cap of {} host bytes ({} in use)",
                    self.limits.host_bytes, self.host_bytes
                ),
            );
        };
        self.host_bytes += bytes;
        self.resources.insert(
            id,
            Resource {
                format,
                width: w,
                height: h,
                pixels: if self.ledger {
                    Vec::new()
                } else {
                    vec![0; bytes as usize]
                },
                backing: Vec::new(),
            },
        );
        Ok(())
    }

    fn check_rect(res: &Resource, id: u32, rect: Rect) -> Result<(), Refusal> {
        if rect.inside(res.width, res.height) {
            Ok(())
        } else {
            refuse(
                RESP_ERR_INVALID_PARAMETER,
                format!(
                    "rectangle {}x{}+{}+{} is outside resource {id} ({}x{})",
                    rect.width, rect.height, rect.x, rect.y, res.width, res.height
                ),
            )
        }
    }

    pub fn set_scanout(&mut self, scanout: u32, id: u32, rect: Rect) -> Result<(), Refusal> {
        let i = self.scanout_index(scanout)?;
        if id == 0 {
            let s = &mut self.scanouts[i];
            s.resource = 0;
            if !self.ledger {
                s.frame.fill(0);
                s.flushes += 1;
                let whole = Rect {
                    x: 0,
                    y: 0,
                    width: s.width,
                    height: s.height,
                };
                if let Some(d) = &mut self.damage {
                    d.push((i, whole));
                }
            }
            return Ok(());
        }
        let res = Self::lookup(&self.resources, id)?;
        Self::check_rect(res, id, rect)?;
        if rect.is_empty() {
            return refuse(
                RESP_ERR_INVALID_PARAMETER,
                format!("scanout {scanout} would show an empty rectangle"),
            );
        }
        let s = &mut self.scanouts[i];
        s.resource = id;
        s.rect = rect;
        if !self.ledger {
            s.frame.fill(0);
            s.show(res, rect);
            let whole = Rect {
                x: 0,
                y: 0,
                width: s.width,
                height: s.height,
            };
            if let Some(d) = &mut self.damage {
                d.push((i, whole));
            }
        }
        Ok(())
    }

    pub fn flush(&mut self, id: u32, rect: Rect) -> Result<(), Refusal> {
        let res = Self::lookup(&self.resources, id)?;
        Self::check_rect(res, id, rect)?;
        if self.ledger {
            return Ok(());
        }
        for (i, s) in self.scanouts.iter_mut().enumerate() {
            if s.resource != id {
                continue;
            }
            if let (Some(area), Some(d)) = (s.show(res, rect), &mut self.damage) {
                d.push((i, area));
            }
        }
        Ok(())
    }

    /// Checks a transfer of `rect` from `offset` of resource `id`'s backing.
    fn check_transfer(&self, id: u32, rect: Rect, offset: u64) -> Result<(), Refusal> {
        let res = self.resource(id)?;
        Self::check_rect(res, id, rect)?;
        if res.backing.is_empty() {
            return refuse(
                RESP_ERR_UNSPEC,
                format!("resource {id} has no backing to transfer from"),
            );
        }
        let stride = res.stride() as u64;
        let line = u64::from(rect.width) * 4;
        let need = (u64::from(rect.height.max(1)) - 1)
            .checked_mul(stride)
            .and_then(|v| v.checked_add(line))
            .and_then(|v| v.checked_add(offset));
        let have = res.backing_len();
        if need.is_none_or(|n| n > have) {
            return refuse(
                RESP_ERR_INVALID_PARAMETER,
                format!(
                    "the transfer of {}x{} at offset {offset} reads past resource {id}'s backing of {have} bytes",
                    rect.width, rect.height
                ),
            );
        }
        Ok(())
    }

    pub fn transfer(
        &mut self,
        id: u32,
        rect: Rect,
        offset: u64,
        mem: &(dyn GuestMemory + Send + Sync),
    ) -> Result<(), Refusal> {
        self.check_transfer(id, rect, offset)?;
        if self.ledger {
            return Ok(());
        }
        let line = u64::from(rect.width) * 4;
        let Some(res) = self.resources.get_mut(&id) else {
            return refuse(
                RESP_ERR_INVALID_RESOURCE_ID,
                format!("resource {id} vanished"),
            );
        };
        let stride = res.stride();
        let starts = res.backing_starts();
        for row in 0..rect.height as usize {
            let src = offset + (row as u64) * stride as u64;
            let dst = (rect.y as usize + row) * stride + rect.x as usize * 4;
            let out = &mut res.pixels[dst..dst + line as usize];
            Resource::read_backing(&res.backing, &starts, mem, src, out).map_err(|why| {
                Refusal {
                    code: RESP_ERR_UNSPEC,
                    why: format!("resource {id}: {why}"),
                }
            })?;
        }
        Ok(())
    }

    /// The pixels a transfer of `rect` from `offset` of resource `id`'s backing reads
    /// (checked as [`transfer`](Self::transfer) checks), `rect.width * 4` bytes a line.
    pub fn gather(
        &self,
        id: u32,
        rect: Rect,
        offset: u64,
        mem: &(dyn GuestMemory + Send + Sync),
    ) -> Result<Vec<u8>, Refusal> {
        self.check_transfer(id, rect, offset)?;
        let res = self.resource(id)?;
        let stride = res.stride() as u64;
        let line = rect.width as usize * 4;
        let starts = res.backing_starts();
        let mut out = vec![0; line * rect.height as usize];
        for (row, dst) in out.chunks_exact_mut(line.max(1)).enumerate() {
            Resource::read_backing(
                &res.backing,
                &starts,
                mem,
                offset + row as u64 * stride,
                dst,
            )
            .map_err(|why| Refusal {
                code: RESP_ERR_UNSPEC,
                why: format!("resource {id}: {why}"),
            })?;
        }
        Ok(out)
    }

    /// Writes `data` (`rect.width * 4` bytes a line) into `rect` of resource `id`: a
    /// transfer whose pixels were gathered elsewhere.
    pub fn transfer_rows(&mut self, id: u32, rect: Rect, data: &[u8]) -> Result<(), Refusal> {
        let res = self.resource(id)?;
        Self::check_rect(res, id, rect)?;
        let line = rect.width as usize * 4;
        if data.len() != line * rect.height as usize {
            return refuse(
                RESP_ERR_INVALID_PARAMETER,
                format!(
                    "{} bytes of pixels for a {}x{} rectangle",
                    data.len(),
                    rect.width,
                    rect.height
                ),
            );
        }
        if self.ledger || line == 0 {
            return Ok(());
        }
        let Some(res) = self.resources.get_mut(&id) else {
            return refuse(
                RESP_ERR_INVALID_RESOURCE_ID,
                format!("resource {id} vanished"),
            );
        };
        let stride = res.stride();
        for (row, src) in data.chunks_exact(line).enumerate() {
            let dst = (rect.y as usize + row) * stride + rect.x as usize * 4;
            res.pixels[dst..dst + line].copy_from_slice(src);
        }
        Ok(())
    }

    /// Gives scanout `index` the mode `width` x `height`, keeping what it shows; its
    /// frame goes dark until the next flush.
    pub fn set_mode(&mut self, index: usize, width: u32, height: u32) -> Result<(), String> {
        let n = self.scanouts.len();
        let Some(s) = self.scanouts.get_mut(index) else {
            return Err(format!("display {index} does not exist: this GPU has {n}"));
        };
        let (res, rect) = (s.resource, s.rect);
        *s = Scanout::new(width, height);
        s.resource = res;
        s.rect = rect;
        Ok(())
    }

    /// Forgets resource `id` (a ledger undoing a creation the back end refused).
    pub fn forget(&mut self, id: u32) {
        if let Some(res) = self.resources.remove(&id) {
            let bytes = u64::from(res.width) * u64::from(res.height) * 4;
            self.host_bytes = self.host_bytes.saturating_sub(bytes);
        }
    }

    fn attach_backing(
        &mut self,
        id: u32,
        n: u32,
        r: &mut Reader<'_>,
        mem: &(dyn GuestMemory + Send + Sync),
    ) -> Result<(), Refusal> {
        let res = self.resource(id)?;
        if !res.backing.is_empty() {
            return refuse(
                RESP_ERR_UNSPEC,
                format!("resource {id} has a backing already: detach it first"),
            );
        }
        if n == 0 || n > self.limits.backing_entries {
            return refuse(
                RESP_ERR_INVALID_PARAMETER,
                format!(
                    "a backing of {n} entries (1 to {} allowed)",
                    self.limits.backing_entries
                ),
            );
        }
        let mut backing = Vec::with_capacity(n as usize);
        for i in 0..n {
            let (Some(addr), Some(len), Some(_)) = (r.u64(), r.u32(), r.u32()) else {
                return refuse(
                    RESP_ERR_INVALID_PARAMETER,
                    format!("the request ends before backing entry {i} of {n}"),
                );
            };
            if len == 0 || mem.span(addr, u64::from(len)).is_err() {
                return refuse(
                    RESP_ERR_INVALID_PARAMETER,
                    format!("backing entry {i} ({addr:#x}, {len} bytes) is empty or not inside guest RAM"),
                );
            }
            backing.push((addr, len));
        }
        if let Some(res) = self.resources.get_mut(&id) {
            res.backing = backing;
        }
        Ok(())
    }
}

fn ok() -> (u32, Vec<u8>) {
    (RESP_OK_NODATA, Vec::new())
}
