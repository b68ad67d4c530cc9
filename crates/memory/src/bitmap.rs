//! The one dirty bitmap: a bit per 4 KiB page, per region.
//!
//! The word format is KVM's `KVM_GET_DIRTY_LOG`: bit `b` of word `w` (least significant bit
//! first) is page `w * 64 + b` of the region, so KVM's words are taken as they are.
use crate::layout::{MemoryLayout, PAGE_SIZE};

/// One bit per page of one region.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PageBitmap {
    words: Vec<u64>,
    pages: usize,
}

impl PageBitmap {
    /// All clean.
    pub fn new(pages: usize) -> Self {
        Self {
            words: vec![0; pages.div_ceil(64)],
            pages,
        }
    }

    /// Every page set.
    pub fn full(pages: usize) -> Self {
        let mut words = vec![u64::MAX; pages.div_ceil(64)];
        trim(&mut words, pages);
        Self { words, pages }
    }

    /// Wraps KVM-style words (bit i of word i/64 = page i); bits past `pages` are dropped,
    /// missing words are clean.
    pub fn from_words(mut words: Vec<u64>, pages: usize) -> Self {
        words.resize(pages.div_ceil(64), 0);
        trim(&mut words, pages);
        Self { words, pages }
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Marks `page`; a page past the end is ignored.
    pub fn set(&mut self, page: usize) {
        if page < self.pages {
            self.words[page / 64] |= 1 << (page % 64);
        }
    }

    /// Marks pages `first..first + n` (clipped to the region).
    pub fn set_range(&mut self, first: usize, n: usize) {
        let end = first.saturating_add(n).min(self.pages);
        let mut p = first;
        while p < end {
            if p.is_multiple_of(64) && end - p >= 64 {
                self.words[p / 64] = u64::MAX;
                p += 64;
            } else {
                self.words[p / 64] |= 1 << (p % 64);
                p += 1;
            }
        }
    }

    pub fn get(&self, page: usize) -> bool {
        page < self.pages && self.words[page / 64] & (1 << (page % 64)) != 0
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn is_clean(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// ORs `other` in; words past either end are ignored.
    pub fn union(&mut self, other: &PageBitmap) {
        self.union_words(&other.words);
    }

    /// ORs KVM-style words in; bits past this bitmap's pages are dropped.
    pub fn union_words(&mut self, words: &[u64]) {
        for (a, b) in self.words.iter_mut().zip(words) {
            *a |= b;
        }
        trim(&mut self.words, self.pages);
    }

    /// Clears every page.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// The set pages, and this bitmap clean.
    pub fn take(&mut self) -> PageBitmap {
        std::mem::replace(self, PageBitmap::new(self.pages))
    }

    /// Indices of set pages, ascending.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(wi * 64 + bit)
            })
        })
    }

    /// Set pages as runs `(first, count)`, ascending: what a writer turns into one I/O each.
    pub fn runs(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let mut it = self.iter().peekable();
        std::iter::from_fn(move || {
            let first = it.next()?;
            let mut n = 1;
            while it.peek() == Some(&(first + n)) {
                it.next();
                n += 1;
            }
            Some((first, n))
        })
    }
}

fn trim(words: &mut [u64], pages: usize) {
    if !pages.is_multiple_of(64) {
        if let Some(last) = words.last_mut() {
            *last &= (1u64 << (pages % 64)) - 1;
        }
    }
}

/// Pages of guest memory, one [`PageBitmap`] per region of a [`MemoryLayout`], in its order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DirtyBitmap {
    pub regions: Vec<PageBitmap>,
}

impl DirtyBitmap {
    /// All clean, sized for `layout`.
    pub fn clean(layout: &MemoryLayout) -> DirtyBitmap {
        DirtyBitmap {
            regions: layout
                .regions
                .iter()
                .map(|r| PageBitmap::new(r.pages() as usize))
                .collect(),
        }
    }

    /// Every page of `layout` set.
    pub fn full(layout: &MemoryLayout) -> DirtyBitmap {
        DirtyBitmap {
            regions: layout
                .regions
                .iter()
                .map(|r| PageBitmap::full(r.pages() as usize))
                .collect(),
        }
    }

    /// From KVM-style words per region (what `KVM_GET_DIRTY_LOG` returns, slot by slot).
    pub fn from_words(layout: &MemoryLayout, words: Vec<Vec<u64>>) -> DirtyBitmap {
        let mut words = words.into_iter();
        DirtyBitmap {
            regions: layout
                .regions
                .iter()
                .map(|r| {
                    PageBitmap::from_words(words.next().unwrap_or_default(), r.pages() as usize)
                })
                .collect(),
        }
    }

    /// Marks every page touching `gpa..gpa + len` dirty; false if that is outside `layout`.
    pub fn mark(&mut self, layout: &MemoryLayout, gpa: u64, len: u64) -> bool {
        let Some(i) = layout.find(gpa, len.max(1)) else {
            return false;
        };
        let Some(bits) = self.regions.get_mut(i) else {
            return false;
        };
        let r = layout.regions[i];
        let first = (gpa - r.gpa) / PAGE_SIZE;
        let last = (gpa + len.max(1) - 1 - r.gpa) / PAGE_SIZE;
        bits.set_range(first as usize, (last - first + 1) as usize);
        true
    }

    /// ORs `other` in, region by region.
    pub fn union(&mut self, other: &DirtyBitmap) {
        for (mine, theirs) in self.regions.iter_mut().zip(&other.regions) {
            mine.union(theirs);
        }
    }

    pub fn is_dirty(&self, region: usize, page: u64) -> bool {
        self.regions
            .get(region)
            .is_some_and(|b| b.get(page as usize))
    }

    /// Checks there is one bitmap per region of `layout`, each of its size.
    pub fn check(&self, layout: &MemoryLayout) -> Result<(), String> {
        if self.regions.len() != layout.regions.len() {
            return Err(format!(
                "the dirty bitmap has {} regions, guest memory has {}",
                self.regions.len(),
                layout.regions.len()
            ));
        }
        for (i, (bits, r)) in self.regions.iter().zip(&layout.regions).enumerate() {
            if bits.pages() as u64 != r.pages() {
                return Err(format!(
                    "the dirty bitmap of region {i} covers {} pages, the region has {}",
                    bits.pages(),
                    r.pages()
                ));
            }
        }
        Ok(())
    }

    pub fn count(&self) -> u64 {
        self.regions.iter().map(PageBitmap::count).sum()
    }

    pub fn is_clean(&self) -> bool {
        self.regions.iter().all(PageBitmap::is_clean)
    }

    /// The set pages, and this bitmap clean.
    pub fn take(&mut self) -> DirtyBitmap {
        DirtyBitmap {
            regions: self.regions.iter_mut().map(PageBitmap::take).collect(),
        }
    }

    /// Guest-physical addresses of the set pages, region by region, ascending.
    pub fn gpas<'a>(&'a self, layout: &'a MemoryLayout) -> impl Iterator<Item = u64> + 'a {
        self.regions
            .iter()
            .zip(&layout.regions)
            .flat_map(|(bits, r)| bits.iter().map(move |p| r.gpa + p as u64 * PAGE_SIZE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_bitmap_sets_counts_iterates_and_unions() {
        let mut a = PageBitmap::new(130);
        a.set(0);
        a.set(64);
        a.set(129);
        a.set(500); // out of range: ignored
        assert_eq!(a.count(), 3);
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![0, 64, 129]);
        let mut b = PageBitmap::new(130);
        b.set(1);
        b.union(&a);
        assert_eq!(b.count(), 4);
        assert!(b.get(1) && b.get(129) && !b.get(2) && !b.get(999));
        assert_eq!(PageBitmap::full(130).count(), 130);
        assert_eq!(
            PageBitmap::from_words(vec![u64::MAX, u64::MAX], 70).count(),
            70
        );
        let mut c = PageBitmap::new(200);
        c.set_range(3, 150);
        assert_eq!(c.count(), 150);
        assert_eq!(c.runs().collect::<Vec<_>>(), vec![(3, 150)]);
        c.set_range(190, 100);
        assert_eq!(c.count(), 160);
        let taken = c.take();
        assert_eq!(taken.count(), 160);
        assert!(c.is_clean());
        b.union_words(&[0, 0, u64::MAX]);
        assert_eq!(b.count(), 5, "bits past the region are dropped");
    }

    #[test]
    fn dirty_bitmap_marks_pages_like_kvm() {
        let layout = MemoryLayout::new(&[(0, 0x10000), (0x100000, 0x1000)]).unwrap();
        let mut d = DirtyBitmap::clean(&layout);
        assert!(d.check(&layout).is_ok());
        assert!(d.mark(&layout, 0x1ff0, 0x20), "straddles pages 1 and 2");
        assert!(d.mark(&layout, 0x100000, 1));
        assert!(!d.mark(&layout, 0x20000, 1), "outside guest memory");
        assert_eq!(d.count(), 3);
        assert!(d.is_dirty(0, 1) && d.is_dirty(0, 2) && d.is_dirty(1, 0));
        assert_eq!(
            d.gpas(&layout).collect::<Vec<_>>(),
            vec![0x1000, 0x2000, 0x100000]
        );
        let kvm = DirtyBitmap::from_words(&layout, vec![vec![1 << 5], vec![]]);
        d.union(&kvm);
        assert_eq!(d.count(), 4);
        let full = DirtyBitmap::full(&layout);
        assert_eq!(full.count(), 17);
        let other = MemoryLayout::new(&[(0, 0x20000)]).unwrap();
        assert!(d.check(&other).is_err());
    }
}
