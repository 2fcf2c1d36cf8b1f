//! Collective communication between data-parallel training workers.
//!
//! Every worker (rank) holds a full replica of the model and trains on its own shard of each
//! global batch; after the backward pass the workers sum their gradients with
//! [`Collective::all_reduce_sum`] so that every replica applies the same update. The training
//! loop is written once against this trait: [`InProcessGroup`] connects worker threads on the
//! CPU (and is what the tests use), `NcclCollective` (feature `nccl`) connects GPUs with NCCL.
//!
//! Sums are taken in rank order, so every rank receives bit-identical results and the replicas
//! never drift apart.

use std::sync::{Arc, Condvar, Mutex};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// What data-parallel workers need from each other.
pub trait Collective: Send {
    /// This worker's rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Number of workers.
    fn world_size(&self) -> usize;
    /// Sums a 1-D f32 tensor over all ranks; every rank receives the same sum, on the device its
    /// input was on.
    fn all_reduce_sum(&self, flat: &Tensor) -> Result<Tensor>;
    /// Sums small host values (losses, token counts) over all ranks, in place.
    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()>;
    /// Tells the other ranks that this one failed, so that they stop waiting for it and return
    /// an error instead of hanging.
    fn abort(&self, reason: &str);
}

/// The trivial group of one worker: reductions are identities.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleWorker;

impl Collective for SingleWorker {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, flat: &Tensor) -> Result<Tensor> {
        Ok(flat.clone())
    }
    fn all_reduce_f64(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn abort(&self, _reason: &str) {}
}

/// Payload exchanged in one round.
#[derive(Debug, Clone)]
enum Payload {
    F32(Arc<Vec<f32>>),
    F64(Arc<Vec<f64>>),
}

#[derive(Debug)]
struct Round {
    /// Contributions of this round, by rank.
    slots: Vec<Option<Payload>>,
    /// Ranks that deposited into the round being filled.
    arrived: usize,
    /// The reduced value, once every rank arrived.
    result: Option<Payload>,
    /// Ranks that have taken the result.
    departed: usize,
    /// Set by [`Collective::abort`]: why the group stopped.
    aborted: Option<String>,
}

#[derive(Debug)]
struct Shared {
    round: Mutex<Round>,
    changed: Condvar,
    world: usize,
}

/// Worker threads of one process exchanging gradients through shared memory: the CPU
/// data-parallel backend (`kb-train --accelerator cpu --dp_workers N`).
#[derive(Debug, Clone)]
pub struct InProcessGroup {
    shared: Arc<Shared>,
    rank: usize,
}

impl InProcessGroup {
    /// Creates the handles of a group of `world` workers, one per rank (rank = index).
    pub fn new(world: usize) -> Vec<InProcessGroup> {
        assert!(world >= 1, "a group needs at least one worker");
        let shared = Arc::new(Shared {
            round: Mutex::new(Round {
                slots: vec![None; world],
                arrived: 0,
                result: None,
                departed: 0,
                aborted: None,
            }),
            changed: Condvar::new(),
            world,
        });
        (0..world)
            .map(|rank| InProcessGroup {
                shared: shared.clone(),
                rank,
            })
            .collect()
    }

    fn aborted_error(reason: &str) -> Error {
        Error::PeerFailed(reason.to_string())
    }

    /// Deposits `mine`, waits for every rank, and returns the rank-ordered sum.
    fn exchange(&self, mine: Payload) -> Result<Payload> {
        let s = &self.shared;
        let mut round = s.round.lock().expect("collective lock");
        // A previous round may still be draining: wait until every rank took its result.
        while round.result.is_some() && round.aborted.is_none() {
            round = s.changed.wait(round).expect("collective lock");
        }
        if let Some(reason) = &round.aborted {
            return Err(Self::aborted_error(reason));
        }
        round.slots[self.rank] = Some(mine);
        round.arrived += 1;
        if round.arrived == s.world {
            let sum = sum_in_rank_order(&round.slots)?;
            round.result = Some(sum);
            round.slots.iter_mut().for_each(|x| *x = None);
            s.changed.notify_all();
        } else {
            while round.result.is_none() && round.aborted.is_none() {
                round = s.changed.wait(round).expect("collective lock");
            }
            if let Some(reason) = &round.aborted {
                return Err(Self::aborted_error(reason));
            }
        }
        let out = round.result.clone().expect("result present");
        round.departed += 1;
        if round.departed == s.world {
            round.result = None;
            round.arrived = 0;
            round.departed = 0;
            s.changed.notify_all();
        }
        Ok(out)
    }
}

fn sum_in_rank_order(slots: &[Option<Payload>]) -> Result<Payload> {
    match slots[0].as_ref().expect("every rank deposited") {
        Payload::F32(_) => Ok(Payload::F32(Arc::new(sum_slots(slots, |p| match p {
            Payload::F32(v) => Some(v.as_slice()),
            Payload::F64(_) => None,
        })?))),
        Payload::F64(_) => Ok(Payload::F64(Arc::new(sum_slots(slots, |p| match p {
            Payload::F64(v) => Some(v.as_slice()),
            Payload::F32(_) => None,
        })?))),
    }
}

/// Element-wise sum of every rank's values, rank 0 first.
fn sum_slots<T: Copy + std::ops::AddAssign>(
    slots: &[Option<Payload>],
    values: impl Fn(&Payload) -> Option<&[T]>,
) -> Result<Vec<T>> {
    let mismatch = || Error::Invalid("training workers exchanged values of different sizes".into());
    let mut parts = slots.iter().map(|s| s.as_ref().and_then(&values));
    let mut acc = parts.next().flatten().ok_or_else(mismatch)?.to_vec();
    for part in parts {
        let part = part.ok_or_else(mismatch)?;
        if part.len() != acc.len() {
            return Err(mismatch());
        }
        acc.iter_mut().zip(part).for_each(|(a, &b)| *a += b);
    }
    Ok(acc)
}

impl Collective for InProcessGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, flat: &Tensor) -> Result<Tensor> {
        if self.shared.world == 1 {
            return Ok(flat.clone());
        }
        let device = flat.device().clone();
        let host: Vec<f32> = flat
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .to_vec1()?;
        let Payload::F32(sum) = self.exchange(Payload::F32(Arc::new(host)))? else {
            unreachable!("f32 in, f32 out")
        };
        let n = sum.len();
        Ok(Tensor::from_slice(sum.as_slice(), n, &device)?.to_dtype(flat.dtype())?)
    }

    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()> {
        if self.shared.world == 1 {
            return Ok(());
        }
        let Payload::F64(sum) = self.exchange(Payload::F64(Arc::new(values.to_vec())))? else {
            unreachable!("f64 in, f64 out")
        };
        values.copy_from_slice(&sum);
        Ok(())
    }

    fn abort(&self, reason: &str) {
        let mut round = self.shared.round.lock().expect("collective lock");
        if round.aborted.is_none() {
            round.aborted = Some(format!("rank {}: {reason}", self.rank));
        }
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_reduce_sums_in_rank_order_over_many_rounds() {
        let group = InProcessGroup::new(3);
        let results: Vec<Vec<(Vec<f32>, f64)>> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .iter()
                .map(|g| {
                    s.spawn(move || {
                        (0..50)
                            .map(|round| {
                                let v = vec![g.rank() as f32 + round as f32; 4];
                                let t = Tensor::from_vec(v, 4, &Device::Cpu).unwrap();
                                let sum = g.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap();
                                let mut x = [1.0, g.rank() as f64];
                                g.all_reduce_f64(&mut x).unwrap();
                                (sum, x[0] + x[1])
                            })
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for per_rank in &results {
            for (round, (sum, scalar)) in per_rank.iter().enumerate() {
                assert_eq!(sum, &vec![3.0 + 3.0 * round as f32; 4]);
                assert_eq!(*scalar, 3.0 + 3.0);
            }
        }
    }

    #[test]
    fn abort_releases_waiting_ranks_with_an_error() {
        let group = InProcessGroup::new(2);
        let (a, b) = (group[0].clone(), group[1].clone());
        let waiter = std::thread::spawn(move || {
            let mut x = [1.0];
            a.all_reduce_f64(&mut x)
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        b.abort("disk full");
        let err = waiter.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("rank 1: disk full"), "{err}");
        let mut x = [1.0];
        assert!(b.all_reduce_f64(&mut x).is_err());
    }
}
