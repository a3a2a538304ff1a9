//! The inter-layer allocator (spec §5).
//!
//! Every registered layer `l` has `N_l = in·out` entries. After each backward pass
//! [`Allocator::observe`] updates the per-element importance EMAs `Ī, Ū` of the layer's `A` and `B`
//! (via [`importance_update`]); at the start of each round [`Allocator::begin_round`] turns them into
//! normalised layer scores, splits the round's budget `V` of kept entries in proportion (capped at
//! `N_l`, remainder redistributed), and sets `s_l = 1 − v_l/N_l`.

use serde::{Deserialize, Serialize};
use snella_core::snella::importance::importance_update;
use snella_core::st::{HostTensor, TensorFile};
use snella_core::{Result, SnellaError};

/// The allocator's schedule and EMA settings (spec §5).
///
/// The default matches the released code: `s0 = 0.01`, `sT = 0.5`, `β1 = β2 = 0.85`, `T = 40`
/// rounds, no warm-up or final rounds, re-allocation every round after round 0, i.e.
/// `V = VT + (V0 − VT)·(1 − t/T)³`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AllocatorConfig {
    /// Initial sparsity `s0 ∈ [0, 1)`.
    pub s0: f64,
    /// Target sparsity `sT ∈ [0, 1)`.
    pub s_t: f64,
    /// EMA factor `β1 ∈ [0, 1)` of the importance `Ī`.
    pub beta1: f64,
    /// EMA factor `β2 ∈ [0, 1)` of the uncertainty `Ū`.
    pub beta2: f64,
    /// Number of rounds `T` (epochs by default).
    pub rounds: usize,
    /// Warm-up rounds `t_i`: rounds `t ≤ t_i` keep every layer at `s0`.
    pub warmup_rounds: usize,
    /// Final rounds `t_f`: rounds `t > T − t_f` use the budget `VT`.
    pub final_rounds: usize,
    /// Re-allocate in the cubic phase only when `t % interval == 0` (`interval ≥ 1`).
    pub interval: usize,
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        AllocatorConfig {
            s0: 0.01,
            s_t: 0.5,
            beta1: 0.85,
            beta2: 0.85,
            rounds: 40,
            warmup_rounds: 0,
            final_rounds: 0,
            interval: 1,
        }
    }
}

impl AllocatorConfig {
    /// Checks the ranges of spec §5: `s0`, `sT`, `β1`, `β2` in `[0, 1)`, `T > t_i + t_f`,
    /// `interval ≥ 1`. The error names the offending field.
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [("s0", self.s0), ("s_t", self.s_t), ("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(SnellaError::config(field, v, "allowed [0, 1)"));
            }
        }
        if self.rounds <= self.warmup_rounds + self.final_rounds {
            return Err(SnellaError::config(
                "rounds",
                self.rounds,
                &format!(
                    "must exceed warmup_rounds + final_rounds = {} + {} (schedule with no room)",
                    self.warmup_rounds, self.final_rounds
                ),
            ));
        }
        if self.interval == 0 {
            return Err(SnellaError::config("interval", 0, "must be at least 1"));
        }
        Ok(())
    }
}

/// One layer registered with the allocator (spec §5).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// The layer's name, used in events and history.
    pub name: String,
    /// Input features (`in`).
    pub n_in: usize,
    /// Output features (`out`).
    pub n_out: usize,
    /// Number of elements of the layer's `A` (`H·in·r/H`).
    pub a_len: usize,
    /// Number of elements of the layer's `B` (`H·out·r/H`).
    pub b_len: usize,
}

/// What one round decided (spec §5: the per-layer sparsities and scores are training history).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// The round `t`.
    pub round: usize,
    /// The schedule's budget `V(t)` of kept entries ([`Allocator::budget`]).
    pub budget: f64,
    /// The per-layer sparsities in force for this round.
    pub sparsities: Vec<f64>,
    /// The normalised per-layer scores at the start of this round.
    pub scores: Vec<f64>,
}

/// A non-finite importance seen by [`Allocator::observe`] (spec §5, Decision).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AllocatorEvent {
    /// The optimizer step of the observation.
    pub step: u64,
    /// The layer's name.
    pub layer: String,
    /// `"A"` or `"B"`.
    pub param: String,
    /// How many elements had a non-finite `|p·∇p|` (each replaced by 0).
    pub count: usize,
}

/// Per-layer allocator state: capacity and the EMAs of `A` and `B` (spec §5).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct LayerState {
    name: String,
    /// `N_l = in·out`.
    n: usize,
    /// Registered lengths of `A` and `B` (the EMA vectors may be stripped for serialisation).
    a_len: usize,
    b_len: usize,
    ibar_a: Vec<f32>,
    ubar_a: Vec<f32>,
    ibar_b: Vec<f32>,
    ubar_b: Vec<f32>,
}

/// The inter-layer competition (spec §5): importance EMAs, the cubic budget schedule, and the
/// per-layer sparsities with their history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Allocator {
    cfg: AllocatorConfig,
    layers: Vec<LayerState>,
    sparsities: Vec<f64>,
    history: Vec<RoundRecord>,
    events: Vec<AllocatorEvent>,
}

/// `mean(Ī ⊙ Ū)` in f64 (0 for an empty parameter).
fn mean_product(ibar: &[f32], ubar: &[f32]) -> f64 {
    if ibar.is_empty() {
        return 0.0;
    }
    ibar.iter().zip(ubar).map(|(&i, &u)| i as f64 * u as f64).sum::<f64>() / ibar.len() as f64
}

impl Allocator {
    /// A new allocator over `layers` (spec §5); validates `cfg` and that every layer has
    /// `in·out > 0`. All sparsities start at `s0`; the EMAs start at 0.
    pub fn new(cfg: AllocatorConfig, layers: Vec<LayerInfo>) -> Result<Self> {
        cfg.validate()?;
        let layers = layers
            .into_iter()
            .map(|l| {
                let n = l.n_in * l.n_out;
                if n == 0 {
                    return Err(SnellaError::config(
                        &format!("layer '{}'", l.name),
                        format!("{}x{}", l.n_in, l.n_out),
                        "in·out must be positive",
                    ));
                }
                Ok(LayerState {
                    name: l.name,
                    n,
                    a_len: l.a_len,
                    b_len: l.b_len,
                    ibar_a: vec![0.0; l.a_len],
                    ubar_a: vec![0.0; l.a_len],
                    ibar_b: vec![0.0; l.b_len],
                    ubar_b: vec![0.0; l.b_len],
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let sparsities = vec![cfg.s0; layers.len()];
        Ok(Allocator { cfg, layers, sparsities, history: Vec::new(), events: Vec::new() })
    }

    /// The configuration (spec §5).
    pub fn config(&self) -> &AllocatorConfig {
        &self.cfg
    }

    /// The layer names, in registration order (spec §5).
    pub fn names(&self) -> Vec<&str> {
        self.layers.iter().map(|l| l.name.as_str()).collect()
    }

    /// The capacities `N_l = in·out` (spec §5).
    pub fn capacities(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.n).collect()
    }

    /// After a backward pass (spec §5): updates the EMAs of layer `layer` from its parameters and
    /// gradients (`a, ga` for `A`; `b, gb` for `B`) with [`importance_update`]. Non-finite
    /// importances count as 0 and are recorded as an [`AllocatorEvent`] at `step`.
    ///
    /// # Panics
    /// If `layer` is out of range or a slice length differs from the registered `a_len`/`b_len`.
    pub fn observe(&mut self, step: u64, layer: usize, a: &[f32], ga: &[f32], b: &[f32], gb: &[f32]) {
        let (b1, b2) = (self.cfg.beta1 as f32, self.cfg.beta2 as f32);
        let l = &mut self.layers[layer];
        let bad_a = importance_update(a, ga, &mut l.ibar_a, &mut l.ubar_a, b1, b2);
        let bad_b = importance_update(b, gb, &mut l.ibar_b, &mut l.ubar_b, b1, b2);
        self.record_non_finite(step, layer, bad_a, bad_b);
    }

    /// The EMAs of `layer` as `[Ī_A, Ū_A, Ī_B, Ū_B]` (host copy; see [`Allocator::ema_mut`]).
    ///
    /// # Panics
    /// If `layer` is out of range.
    pub fn ema(&self, layer: usize) -> [&[f32]; 4] {
        let l = &self.layers[layer];
        [&l.ibar_a, &l.ubar_a, &l.ibar_b, &l.ubar_b]
    }

    /// Mutable EMAs of `layer` (`[Ī_A, Ū_A, Ī_B, Ū_B]`), for a trainer that updates them on a device
    /// and writes them back here before they are read (scores, checkpoints).
    ///
    /// # Panics
    /// If `layer` is out of range.
    pub fn ema_mut(&mut self, layer: usize) -> [&mut Vec<f32>; 4] {
        let l = &mut self.layers[layer];
        [&mut l.ibar_a, &mut l.ubar_a, &mut l.ibar_b, &mut l.ubar_b]
    }

    /// Records the non-finite importances found by a device-side [`importance_update`] of `layer`
    /// at `step` (`bad_a` in `A`, `bad_b` in `B`), as [`Allocator::observe`] does.
    pub fn record_non_finite(&mut self, step: u64, layer: usize, bad_a: usize, bad_b: usize) {
        let name = &self.layers[layer].name;
        for (param, count) in [("A", bad_a), ("B", bad_b)] {
            if count > 0 {
                self.events.push(AllocatorEvent { step, layer: name.clone(), param: param.into(), count });
            }
        }
    }

    /// `V0 = Σ(1 − s0)·N_l` (spec §5).
    fn v0(&self) -> f64 {
        self.layers.iter().map(|l| (1.0 - self.cfg.s0) * l.n as f64).sum()
    }

    /// `VT = Σ(1 − sT)·N_l` (spec §5).
    fn vt(&self) -> f64 {
        self.layers.iter().map(|l| (1.0 - self.cfg.s_t) * l.n as f64).sum()
    }

    /// The budget of kept entries in round `t` (spec §5): `V0` for `t ≤ t_i`, `VT` for
    /// `t > T − t_f`, otherwise `VT + (V0 − VT)·(1 − (t − t_i)/(T − t_f − t_i))³`.
    pub fn budget(&self, t: usize) -> f64 {
        let (ti, tf, tt) = (self.cfg.warmup_rounds, self.cfg.final_rounds, self.cfg.rounds);
        let (v0, vt) = (self.v0(), self.vt());
        if t <= ti {
            v0
        } else if t > tt - tf {
            vt
        } else {
            let frac = (t - ti) as f64 / (tt - tf - ti) as f64;
            vt + (v0 - vt) * (1.0 - frac).powi(3)
        }
    }

    /// The normalised layer scores (spec §5): `mean(Ī⊙Ū over A_l) + mean(Ī⊙Ū over B_l)`,
    /// divided by their sum; when they are all 0 (or not finite), the capacity split `N_l/ΣN`.
    pub fn scores(&self) -> Vec<f64> {
        let raw: Vec<f64> = self
            .layers
            .iter()
            .map(|l| mean_product(&l.ibar_a, &l.ubar_a) + mean_product(&l.ibar_b, &l.ubar_b))
            .collect();
        let total: f64 = raw.iter().sum();
        if total > 0.0 && total.is_finite() {
            raw.iter().map(|s| s / total).collect()
        } else {
            let n_total: f64 = self.layers.iter().map(|l| l.n as f64).sum();
            self.layers.iter().map(|l| l.n as f64 / n_total).collect()
        }
    }

    /// Splits the budget `v_total` by `scores` (spec §5): `v_l = min(V·score_l, N_l)`, then while
    /// `V − Σv ≥ 1` and some layer has room, the remainder goes to the layers with room in
    /// proportion to their scores (by room when those scores are all 0), capped at `N_l`.
    /// Returns the volumes.
    fn volumes(&self, v_total: f64, scores: &[f64]) -> Vec<f64> {
        let cap: Vec<f64> = self.layers.iter().map(|l| l.n as f64).collect();
        let mut v: Vec<f64> = scores.iter().zip(&cap).map(|(s, n)| (v_total * s).min(*n)).collect();
        // Each pass either fills the remainder or saturates at least one layer: L + 1 passes
        // suffice; the slack only absorbs rounding.
        for _ in 0..2 * cap.len() + 8 {
            let left = v_total - v.iter().sum::<f64>();
            if left < 1.0 {
                break;
            }
            let open: Vec<usize> = (0..cap.len()).filter(|&l| cap[l] - v[l] > 0.0).collect();
            if open.is_empty() {
                break;
            }
            let s_open: f64 = open.iter().map(|&l| scores[l]).sum();
            let room_open: f64 = open.iter().map(|&l| cap[l] - v[l]).sum();
            for &l in &open {
                let room = cap[l] - v[l];
                let w = if s_open > 0.0 { scores[l] / s_open } else { room / room_open };
                let add = left * w;
                if add >= room {
                    v[l] = cap[l];
                } else {
                    v[l] += add;
                }
            }
        }
        v
    }

    /// Starts round `t` (spec §5) and returns the per-layer sparsities for it.
    ///
    /// `t ≤ t_i`: every layer at `s0`, no re-allocation. `t > T − t_f`: re-allocate with `V = VT`.
    /// Otherwise re-allocate with the cubic budget when `t % interval == 0` (else keep the previous
    /// sparsities). Re-allocation sets `s_l = 1 − v_l/N_l` from [`Allocator::scores`] and the
    /// capped volumes. Every round appends a [`RoundRecord`] to the history.
    pub fn begin_round(&mut self, t: usize) -> &[f64] {
        let (ti, tf, tt) = (self.cfg.warmup_rounds, self.cfg.final_rounds, self.cfg.rounds);
        let budget = self.budget(t);
        let scores = self.scores();
        if t <= ti {
            self.sparsities = vec![self.cfg.s0; self.layers.len()];
        } else if t > tt - tf || t.is_multiple_of(self.cfg.interval) {
            let v = self.volumes(budget, &scores);
            self.sparsities =
                v.iter().zip(&self.layers).map(|(vl, l)| (1.0 - vl / l.n as f64).clamp(0.0, 1.0)).collect();
        }
        self.history.push(RoundRecord { round: t, budget, sparsities: self.sparsities.clone(), scores });
        &self.sparsities
    }

    /// The current per-layer sparsities `s_l` (spec §5).
    pub fn sparsities(&self) -> &[f64] {
        &self.sparsities
    }

    /// Every round's record so far (spec §5: part of the training history).
    pub fn history(&self) -> &[RoundRecord] {
        &self.history
    }

    /// The non-finite-importance events so far (spec §5, Decision).
    pub fn events(&self) -> &[AllocatorEvent] {
        &self.events
    }

    /// The per-element EMAs (spec §5) as named 1-D tensors for a safetensors file:
    /// `allocator.<layer>.<A|B>.<ibar|ubar>`. Pairs with [`Allocator::strip_state`] (keeps the
    /// JSON state small) and [`Allocator::load_state_tensors`].
    pub fn state_tensors(&self) -> Vec<(String, HostTensor)> {
        let mut out = Vec::with_capacity(4 * self.layers.len());
        for l in &self.layers {
            for (param, kind, v) in
                [("A", "ibar", &l.ibar_a), ("A", "ubar", &l.ubar_a), ("B", "ibar", &l.ibar_b), ("B", "ubar", &l.ubar_b)]
            {
                out.push((state_name(&l.name, param, kind), HostTensor::new(vec![v.len()], v.clone())));
            }
        }
        out
    }

    /// Drops the per-element EMAs (spec §5) so that serialising the allocator stores only its
    /// schedule, sparsities, history and events; restore them with
    /// [`Allocator::load_state_tensors`] before the next [`Allocator::observe`].
    pub fn strip_state(&mut self) {
        for l in &mut self.layers {
            for v in [&mut l.ibar_a, &mut l.ubar_a, &mut l.ibar_b, &mut l.ubar_b] {
                *v = Vec::new();
            }
        }
    }

    /// Restores the per-element EMAs (spec §5) from the tensors written by
    /// [`Allocator::state_tensors`], taking them out of `f`.
    ///
    /// # Errors
    /// [`SnellaError::Tensor`] naming the file and tensor when one is missing or has the wrong length.
    pub fn load_state_tensors(&mut self, f: &mut TensorFile) -> Result<()> {
        for l in &mut self.layers {
            let (a_len, b_len) = (l.a_len, l.b_len);
            l.ibar_a = f.take(&state_name(&l.name, "A", "ibar"), &[a_len])?.data;
            l.ubar_a = f.take(&state_name(&l.name, "A", "ubar"), &[a_len])?.data;
            l.ibar_b = f.take(&state_name(&l.name, "B", "ibar"), &[b_len])?.data;
            l.ubar_b = f.take(&state_name(&l.name, "B", "ubar"), &[b_len])?.data;
        }
        Ok(())
    }
}

/// The tensor name of one EMA vector in [`Allocator::state_tensors`].
fn state_name(layer: &str, param: &str, kind: &str) -> String {
    format!("allocator.{layer}.{param}.{kind}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(name: &str, n_in: usize, n_out: usize) -> LayerInfo {
        LayerInfo { name: name.into(), n_in, n_out, a_len: 2 * n_in * 2, b_len: 2 * n_out * 2 }
    }

    fn field_of(e: SnellaError) -> String {
        match e {
            SnellaError::Config { field, .. } => field,
            other => panic!("expected a config error, got {other}"),
        }
    }

    /// Feeds one observation with `|p·g| = v` everywhere in both A and B of `layer`.
    fn feed(al: &mut Allocator, layer: usize, v: f32) {
        let (na, nb) = (al.layers[layer].ibar_a.len(), al.layers[layer].ibar_b.len());
        al.observe(0, layer, &vec![1.0; na], &vec![v; na], &vec![1.0; nb], &vec![v; nb]);
    }

    #[test]
    fn all_zero_scores_split_by_capacity() {
        let cfg = AllocatorConfig { rounds: 4, final_rounds: 2, ..Default::default() };
        let mut al = Allocator::new(cfg, vec![layer("a", 10, 10), layer("b", 10, 30)]).unwrap();
        assert_eq!(al.sparsities(), &[0.01, 0.01]);
        assert_eq!(al.scores(), vec![0.25, 0.75]);
        // Round 3 > T − t_f = 2: V = VT = 0.5·400 = 200 → v = [50, 150] → s = [0.5, 0.5].
        assert_eq!(al.budget(3), 200.0);
        assert_eq!(al.begin_round(3), &[0.5, 0.5]);
        // Cubic phase, t = 1: V = 200 + (396 − 200)·(1 − 1/2)³ = 224.5 → s = 1 − 224.5/400.
        let s = al.begin_round(1).to_vec();
        let want = 1.0 - 224.5 / 400.0;
        assert!((s[0] - want).abs() < 1e-15 && (s[1] - want).abs() < 1e-15, "{s:?}");
        assert_eq!(al.history().len(), 2);
        assert_eq!(al.history()[0].round, 3);
        assert_eq!(al.history()[1].scores, vec![0.25, 0.75]);
    }

    #[test]
    fn capacity_clamping_redistributes_the_remainder() {
        let cfg = AllocatorConfig { rounds: 2, final_rounds: 1, ..Default::default() };
        let mut al = Allocator::new(cfg, vec![layer("big", 10, 10), layer("mid", 10, 10), layer("wide", 10, 100)]).unwrap();
        feed(&mut al, 0, 1e3);
        feed(&mut al, 1, 1.0);
        feed(&mut al, 2, 1.0);
        let sc = al.scores();
        assert!(sc[0] > 0.999 && (sc[1] - sc[2]).abs() < 1e-12, "{sc:?}");
        // V = VT = 0.5·1200 = 600: big is capped at 100 (s = 0), mid at 100, wide gets 400.
        let v = al.budget(2);
        assert_eq!(v, 600.0);
        let s = al.begin_round(2).to_vec();
        assert_eq!(s[0], 0.0);
        assert_eq!(s[1], 0.0);
        let vol: Vec<f64> = s.iter().zip(al.capacities()).map(|(s, n)| (1.0 - s) * n as f64).collect();
        assert!((vol[2] - 400.0).abs() < 1.0, "{vol:?}");
        assert!((vol.iter().sum::<f64>() - v).abs() < 1.0, "{vol:?}");
    }

    #[test]
    fn schedule_validation_names_the_field() {
        let bad = |c: AllocatorConfig| field_of(Allocator::new(c, vec![layer("x", 2, 2)]).unwrap_err());
        let d = AllocatorConfig::default();
        assert_eq!(bad(AllocatorConfig { s0: 1.0, ..d.clone() }), "s0");
        assert_eq!(bad(AllocatorConfig { s0: -0.1, ..d.clone() }), "s0");
        assert_eq!(bad(AllocatorConfig { s_t: 1.5, ..d.clone() }), "s_t");
        assert_eq!(bad(AllocatorConfig { beta1: 1.0, ..d.clone() }), "beta1");
        assert_eq!(bad(AllocatorConfig { beta2: -0.5, ..d.clone() }), "beta2");
        assert_eq!(bad(AllocatorConfig { interval: 0, ..d.clone() }), "interval");
        let e = Allocator::new(AllocatorConfig { rounds: 5, warmup_rounds: 3, final_rounds: 2, ..d.clone() }, vec![])
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("rounds") && msg.contains("no room"), "{msg}");
        assert!(AllocatorConfig { rounds: 6, warmup_rounds: 3, final_rounds: 2, ..d }.validate().is_ok());
        assert!(field_of(Allocator::new(AllocatorConfig::default(), vec![layer("z", 0, 3)]).unwrap_err()).contains("'z'"));
    }

    #[test]
    fn non_finite_importance_is_an_event() {
        let mut al = Allocator::new(AllocatorConfig::default(), vec![layer("blocks.0.attn.q", 2, 3)]).unwrap();
        let mut ga = vec![0.5f32; 8];
        ga[3] = f32::NAN;
        ga[5] = f32::INFINITY;
        al.observe(17, 0, &[1.0; 8], &ga, &[1.0; 12], &[0.25; 12]);
        assert_eq!(
            al.events(),
            &[AllocatorEvent { step: 17, layer: "blocks.0.attn.q".into(), param: "A".into(), count: 2 }]
        );
        // The non-finite entries count as 0: Ī = 0.15·0.5 elsewhere.
        assert_eq!(al.layers[0].ibar_a[3], 0.0);
        assert!((al.layers[0].ibar_a[0] - 0.075).abs() < 1e-7);
        assert!(al.scores().iter().all(|s| s.is_finite()));
    }

    #[test]
    fn budget_formula_at_0_1_and_last_round() {
        let al = Allocator::new(AllocatorConfig::default(), vec![layer("a", 10, 10), layer("b", 20, 5)]).unwrap();
        // ΣN = 200: V0 = 0.99·200 = 198, VT = 0.5·200 = 100, T = 40.
        assert!((al.budget(0) - 198.0).abs() < 1e-12);
        assert!((al.budget(1) - (100.0 + 98.0 * 0.975f64.powi(3))).abs() < 1e-12);
        assert!((al.budget(1) - 190.83221875).abs() < 1e-9);
        assert!((al.budget(39) - (100.0 + 98.0 / 64000.0)).abs() < 1e-12);
        // Warm-up and final phases.
        let cfg = AllocatorConfig { rounds: 10, warmup_rounds: 2, final_rounds: 3, ..Default::default() };
        let al = Allocator::new(cfg, vec![layer("a", 10, 10), layer("b", 20, 5)]).unwrap();
        assert_eq!(al.budget(2), al.budget(0));
        // t = 3: (1 − 1/5)³ = 0.512.
        assert!((al.budget(3) - (100.0 + 98.0 * 0.512)).abs() < 1e-12);
        assert!((al.budget(7) - 100.0).abs() < 1e-12);
        assert_eq!(al.budget(8), 100.0);
    }

    #[test]
    fn rounds_follow_the_schedule() {
        let cfg = AllocatorConfig { rounds: 10, warmup_rounds: 1, interval: 2, ..Default::default() };
        let mut al = Allocator::new(cfg, vec![layer("a", 10, 10), layer("b", 10, 10)]).unwrap();
        feed(&mut al, 0, 3.0);
        feed(&mut al, 1, 1.0);
        assert_eq!(al.begin_round(0), &[0.01, 0.01]);
        assert_eq!(al.begin_round(1), &[0.01, 0.01]);
        let s2 = al.begin_round(2).to_vec();
        assert!(s2[0] < s2[1], "the more important layer keeps more: {s2:?}");
        assert_eq!(al.begin_round(3), s2.as_slice(), "t % interval ≠ 0 keeps the sparsities");
        assert_eq!(al.history().len(), 4);
        assert_eq!(al.history()[3].budget, al.budget(3));
    }

    #[test]
    fn serde_round_trip() {
        let mut al = Allocator::new(AllocatorConfig::default(), vec![layer("a", 3, 4), layer("b", 4, 3)]).unwrap();
        al.observe(1, 0, &[0.3; 12], &[0.1; 12], &[0.2; 16], &[f32::NAN; 16]);
        al.observe(2, 1, &[0.7; 16], &[0.9; 16], &[0.2; 12], &[0.4; 12]);
        al.begin_round(1);
        let json = serde_json::to_string(&al).unwrap();
        let back: Allocator = serde_json::from_str(&json).unwrap();
        assert_eq!(back, al);
        assert_eq!(back.events().len(), 1);
        assert_eq!(back.history()[0].sparsities, al.sparsities());
        // Stripped JSON + state tensors restore the same allocator.
        let mut f = TensorFile::default();
        for (name, t) in al.state_tensors() {
            f.tensors.insert(name, t);
        }
        assert_eq!(f.tensors["allocator.b.A.ubar"].shape, vec![16]);
        let mut stripped = al.clone();
        stripped.strip_state();
        let mut back: Allocator = serde_json::from_str(&serde_json::to_string(&stripped).unwrap()).unwrap();
        assert_ne!(back, al);
        back.load_state_tensors(&mut f).unwrap();
        assert_eq!(back, al);
        let mut empty = TensorFile::default();
        let err = back.load_state_tensors(&mut empty).unwrap_err().to_string();
        assert!(err.contains("allocator.a.A.ibar"), "{err}");
    }
}
