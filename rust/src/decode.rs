//! Dense decoding: golomb and bitmask streams into output buffers, many streams in one parallel
//! pass.
//!
//! A golomb stream decodes block by block (the block index gives each block's start). The blocks
//! of every stream of one output element type form one list, cut into tasks of about equal size;
//! a task walks its blocks four at a time, a lane taking the next block as soon as its own ends
//! ([`walk_pool`]), so that the small tensors of an expert (two blocks each at 7B LoRA shapes)
//! keep all four chains busy. Each block owns its output range (from its first position to the
//! next block's) and zeroes it a window at a time just ahead of the values written into it.

use rayon::prelude::*;

use crate::codec::{Body, Compressed};
use crate::dtype::{half_bits, DType, TensorMut};
use crate::error::{Error, Result};
use crate::golomb::{walk_pool, BlockRef};
use crate::selection::PASS_CHUNK;
use crate::unpack::{best_kernel, Unpack};

/// An output element type whose zero is all zero bits (u16 half bits, f32, f64).
///
/// # Safety
/// All zero bits must be a valid value of the type, and the one a decode writes for zero.
pub(crate) unsafe trait ZeroBits: Copy + Send + Sync {}
// SAFETY: all zero bits are 0u16 (the half types' +0.0), 0.0f32 and 0.0f64.
unsafe impl ZeroBits for u16 {}
unsafe impl ZeroBits for f32 {}
unsafe impl ZeroBits for f64 {}

/// Zeroes `out` with memset: `fill` with a zero the compiler cannot see is a loop of 16-byte
/// stores, about half as fast on the decode's output ranges.
pub(crate) fn zero_fill<T: ZeroBits>(out: &mut [T]) {
    // SAFETY: `out` is valid for writes of its length, and all zero bits are a T (ZeroBits).
    unsafe { std::ptr::write_bytes(out.as_mut_ptr(), 0, out.len()) }
}

/// One independent piece of a decode: it owns disjoint parts of the outputs. Its error comes
/// with the index of the stream.
type Task<'a> = Box<dyn FnOnce() -> std::result::Result<(), (usize, Error)> + Send + 'a>;

/// Output entries a block's range is zeroed ahead of its values by: small enough that the zeros
/// are still in cache when the values land, large enough that memset runs in long strides.
const WINDOW: usize = 4096;

/// A golomb block to decode: where it is, the output range it owns (position `base` onwards),
/// how far that range is zeroed, the values of +scale and -scale, and its stream's index.
struct Piece<'a, T> {
    src: BlockRef<'a>,
    out: &'a mut [T],
    base: u64,
    zeroed: usize,
    vals: [T; 2],
    stream: usize,
}

/// The golomb blocks of every stream of one element type, in stream order.
struct Plan<'a, T> {
    pieces: Vec<Piece<'a, T>>,
}

impl<'a, T: ZeroBits + Unpack + 'a> Plan<'a, T> {
    fn new() -> Self {
        Plan { pieces: Vec::new() }
    }

    /// Adds stream `i` (checked) decoding into `out`: golomb blocks as pieces, the rest as tasks
    /// of about `per_task` entries.
    fn add(
        &mut self,
        i: usize,
        c: &'a Compressed,
        out: &'a mut [T],
        [pv, nv]: [T; 2],
        per_task: usize,
        tasks: &mut Vec<Task<'a>>,
    ) -> Result<()> {
        advise_huge_pages(out);
        match &c.body {
            Body::Bitmask(m) => {
                // Chunks of whole 64-entry words, at least one pass chunk each.
                let per = per_task.div_ceil(PASS_CHUNK).max(1) * PASS_CHUNK;
                for (ci, oc) in out.chunks_mut(per).enumerate() {
                    let w0 = ci * per / 64;
                    tasks.push(Box::new(move || {
                        T::unpack(best_kernel(), &m.pos[w0..], &m.neg[w0..], oc, [pv, nv]);
                        Ok(())
                    }));
                }
            }
            Body::Golomb(g) => {
                let nb = g.block_count(c.nnz) as usize;
                if nb == 0 {
                    for oc in out.chunks_mut(per_task.max(PASS_CHUNK)) {
                        tasks.push(Box::new(move || {
                            zero_fill(oc);
                            Ok(())
                        }));
                    }
                    return Ok(());
                }
                // Block j owns the positions from its start to block j + 1's (block 0 from 0, the
                // last one to the end): increasing, as the stream's check made sure.
                let mut rest = out;
                let mut from = 0u64;
                for j in 0..nb {
                    let src = g.block_ref(c.numel, c.nnz, j);
                    let k = src.block;
                    let end = if k.last { c.numel } else { k.limit };
                    let len = end
                        .checked_sub(from)
                        .filter(|&l| l as usize <= rest.len())
                        .ok_or_else(|| Error::Malformed("block index is not increasing".into()))?;
                    let (o, tail) = std::mem::take(&mut rest).split_at_mut(len as usize);
                    rest = tail;
                    let base = from;
                    from = end;
                    self.pieces.push(Piece {
                        src,
                        out: o,
                        base,
                        zeroed: 0,
                        vals: [pv, nv],
                        stream: i,
                    });
                }
            }
        }
        Ok(())
    }

    /// The pieces cut into tasks of about `per_task` output entries, in order.
    fn into_tasks(self, per_task: usize, tasks: &mut Vec<Task<'a>>) {
        let mut group = Vec::new();
        let mut size = 0usize;
        for p in self.pieces {
            size += p.out.len();
            group.push(p);
            if size >= per_task {
                tasks.push(pieces_task(std::mem::take(&mut group)));
                size = 0;
            }
        }
        if !group.is_empty() {
            tasks.push(pieces_task(group));
        }
    }
}

/// A task decoding `pieces` through one pool of lanes.
fn pieces_task<'a, T: ZeroBits + 'a>(mut pieces: Vec<Piece<'a, T>>) -> Task<'a> {
    Box::new(move || {
        let srcs: Vec<BlockRef<'a>> = pieces.iter().map(|p| p.src).collect();
        walk_pool(
            srcs.len(),
            |i| srcs[i],
            |i, ps, signs| {
                let p = &mut pieces[i];
                // Positions increase and lie at or after the block's start (`base`); below its
                // limit, the end of its range (checked by the walk).
                let last = (ps[ps.len() - 1] - p.base) as usize;
                if last >= p.zeroed {
                    let end = ((last / WINDOW + 1) * WINDOW).min(p.out.len());
                    zero_fill(&mut p.out[p.zeroed..end]);
                    p.zeroed = end;
                }
                let (o, base, vals) = (&mut p.out[..=last], p.base, p.vals);
                for (r, &at) in ps.iter().enumerate() {
                    o[(at - base) as usize] = vals[((signs >> r) & 1) as usize];
                }
            },
        )
        .map_err(|(i, e)| (pieces[i].stream, e))?;
        for p in pieces {
            zero_fill(&mut p.out[p.zeroed..]);
        }
        Ok(())
    })
}

/// Decodes many streams into their outputs in one parallel pass: golomb blocks of all streams
/// of one element type walked together in tasks of about equal size, so that an expert of
/// hundreds of small tensors keeps every thread and every lane busy. On an error the index of
/// the stream comes with it (when several are bad, which one depends on the threads).
pub fn decode_many<'a>(
    jobs: Vec<(&'a Compressed, TensorMut<'a>)>,
) -> std::result::Result<(), (usize, Error)> {
    let threads = rayon::current_num_threads().max(1);
    let total: u64 = jobs.iter().map(|(c, _)| c.numel.max(1)).sum();
    // About 8 tasks per thread over the whole expert.
    let per_task = (total / (threads as u64 * 8)).max(1) as usize;
    let mut tasks: Vec<Task<'a>> = Vec::new();
    let (mut halves, mut singles, mut doubles) = (Plan::new(), Plan::new(), Plan::new());
    for (i, (c, out)) in jobs.into_iter().enumerate() {
        let at = |e| (i, e);
        if out.len() as u64 != c.numel {
            return Err(at(Error::InvalidArgument(format!(
                "output holds {} entries, the stream {}",
                out.len(),
                c.numel
            ))));
        }
        c.check().map_err(at)?;
        let added = match out {
            TensorMut::F16(o) => {
                let p = half_bits(DType::F16, c.scale);
                halves.add(i, c, o, [p, p | 0x8000], per_task, &mut tasks)
            }
            TensorMut::BF16(o) => {
                let p = half_bits(DType::BF16, c.scale);
                halves.add(i, c, o, [p, p | 0x8000], per_task, &mut tasks)
            }
            TensorMut::F32(o) => {
                let p = c.scale as f32;
                singles.add(i, c, o, [p, -p], per_task, &mut tasks)
            }
            TensorMut::F64(o) => doubles.add(i, c, o, [c.scale, -c.scale], per_task, &mut tasks),
        };
        added.map_err(at)?;
    }
    halves.into_tasks(per_task, &mut tasks);
    singles.into_tasks(per_task, &mut tasks);
    doubles.into_tasks(per_task, &mut tasks);
    tasks.into_par_iter().try_for_each(|t| t())
}

impl Compressed {
    /// Decodes into `out` (numel entries, any supported dtype): sign * scale, rounded to out's type.
    pub fn decode_into(&self, out: TensorMut<'_>) -> Result<()> {
        decode_many(vec![(self, out)]).map_err(|(_, e)| e)
    }
}

/// Asks the kernel for transparent huge pages on a large output buffer that is about to be
/// written for the first time: one fault per 2 MiB instead of per 4 KiB. A hint only; errors are
/// ignored (other systems, or THP turned off).
fn advise_huge_pages<T>(out: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = std::mem::size_of_val(out);
        if bytes < 4 * HUGE {
            return;
        }
        let start = out.as_mut_ptr() as usize;
        let aligned = (start + HUGE - 1) & !(HUGE - 1);
        let end = (start + bytes) & !(HUGE - 1);
        if end > aligned {
            // SAFETY: the range lies inside `out`, which we hold mutably; MADV_HUGEPAGE changes
            // only how pages are backed, never their contents.
            unsafe {
                libc::madvise(
                    aligned as *mut libc::c_void,
                    end - aligned,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = out;
}
