//! The feed-forward half of a block (Jamba, `mamba_ssm` hybrids, MoE-Mamba): a gated MLP,
//! or a sparse mixture of such MLPs (experts) of which a router picks the top k for each
//! token.
//!
//! ```text
//! MLP(x) = (silu(x W_gate^T) * x W_up^T) W_down^T
//! p      = softmax(x W_router^T)                   over the E experts     (tokens, E)
//! MoE(x) = sum over the k largest p_e of  p_e * MLP_e(x)    (the chosen p_e are not renormalised)
//! aux    = E * sum_e f_e * mean_t p_{t,e}          f_e: fraction of the tokens routed to e
//! ```
//!
//! Each expert runs on the tokens routed to it only. The choice of experts is discrete; the
//! output is differentiable with respect to every weight, the router's through `p_e`.
//! `aux` is the load-balancing loss of the Switch Transformer (as transformers computes it
//! for Mixtral and Jamba): it is smallest when the tokens and the router's probability
//! spread evenly over the experts, and its gradient reaches the router through `p`.

use crate::error::Result;
use crate::layers::{columns, f32_vec, Linear};
use candle_core::{Tensor, D};
use candle_nn::VarBuilder;

/// `down(silu(gate(x)) * up(x))`, without biases.
#[derive(Debug, Clone)]
pub struct GatedMlp {
    gate_up: GateUp,
    down_proj: Linear,
}

/// The two input projections of a gated MLP, as a checkpoint stores them.
#[derive(Debug, Clone)]
enum GateUp {
    /// `gate_proj` and `up_proj` (Jamba, Llama-style).
    Separate { gate_proj: Linear, up_proj: Linear },
    /// `mamba_ssm`'s `fc1`, giving `[up | gate]` of `width` each.
    Fused { fc1: Linear, width: usize },
}

impl GatedMlp {
    /// Loads `gate_proj`, `up_proj` `(intermediate, hidden)` and `down_proj` `(hidden, intermediate)`.
    pub fn load(vb: &VarBuilder, hidden: usize, intermediate: usize) -> Result<Self> {
        Ok(GatedMlp {
            gate_up: GateUp::Separate {
                gate_proj: Linear::load(vb, "gate_proj", (intermediate, hidden), false)?,
                up_proj: Linear::load(vb, "up_proj", (intermediate, hidden), false)?,
            },
            down_proj: Linear::load(vb, "down_proj", (hidden, intermediate), false)?,
        })
    }

    /// Loads `mamba_ssm`'s `GatedMLP`: `fc1` `(2 intermediate, hidden)`, whose first half of
    /// outputs is the value and second half the gate, and `fc2` `(hidden, intermediate)`.
    pub fn load_fused(vb: &VarBuilder, hidden: usize, intermediate: usize) -> Result<Self> {
        Ok(GatedMlp {
            gate_up: GateUp::Fused {
                fc1: Linear::load(vb, "fc1", (2 * intermediate, hidden), false)?,
                width: intermediate,
            },
            down_proj: Linear::load(vb, "fc2", (hidden, intermediate), false)?,
        })
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut linears = match &mut self.gate_up {
            GateUp::Separate { gate_proj, up_proj } => vec![gate_proj, up_proj],
            GateUp::Fused { fc1, .. } => vec![fc1],
        };
        linears.push(&mut self.down_proj);
        linears
    }

    /// `x: (..., hidden)` → `(..., hidden)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = match &self.gate_up {
            GateUp::Separate { gate_proj, up_proj } => (gate_proj.forward(x)?, up_proj.forward(x)?),
            GateUp::Fused { fc1, width } => {
                let up_gate = fc1.forward(x)?; // (..., 2 intermediate)
                (
                    columns(&up_gate, *width, *width)?,
                    columns(&up_gate, 0, *width)?,
                )
            }
        }; // (..., intermediate) each
        self.down_proj.forward(&(gate.silu()? * up)?)
    }
}

/// A router over `experts`, each token going to the `top_k` most probable ones.
#[derive(Debug, Clone)]
pub struct SparseMoe {
    router: Linear,
    experts: Vec<GatedMlp>,
    top_k: usize,
}

impl SparseMoe {
    /// Loads `router` `(num_experts, hidden)` and `experts.{e}.*` for every expert.
    pub fn load(
        vb: &VarBuilder,
        hidden: usize,
        intermediate: usize,
        num_experts: usize,
        top_k: usize,
    ) -> Result<Self> {
        let experts = (0..num_experts)
            .map(|e| GatedMlp::load(&vb.pp(format!("experts.{e}")), hidden, intermediate))
            .collect::<Result<Vec<_>>>()?;
        Ok(SparseMoe {
            router: Linear::load(vb, "router", (num_experts, hidden), false)?,
            experts,
            top_k,
        })
    }

    /// `x: (..., hidden)` → `(..., hidden)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_balance_loss(x)?.0)
    }

    /// [`SparseMoe::forward`], with the load-balancing loss `aux` of this call's tokens (a scalar).
    pub fn forward_with_balance_loss(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let shape = x.dims().to_vec();
        let hidden = x.dim(D::Minus1)?;
        let x = x.reshape(((), hidden))?; // (tokens, hidden)
        let probs = candle_nn::ops::softmax(&self.router.forward(&x)?, D::Minus1)?; // (tokens, E)
        let routes = tokens_per_expert(&f32_vec(&probs)?, self.experts.len(), self.top_k);
        let mut out = x.zeros_like()?;
        for (e, tokens) in routes.iter().enumerate() {
            if tokens.is_empty() {
                continue;
            }
            let index = Tensor::from_slice(tokens, tokens.len(), x.device())?;
            let weight = probs.index_select(&index, 0)?.narrow(1, e, 1)?; // (n_e, 1)
            let expert_out = self.experts[e].forward(&x.index_select(&index, 0)?)?; // (n_e, hidden)
            out = out.index_add(&index, &expert_out.broadcast_mul(&weight)?, 0)?;
        }
        Ok((out.reshape(shape)?, balance_loss(&probs, &routes)?))
    }
}

/// `E * sum_e f_e * mean_t probs[t, e]` for `probs: (tokens, E)`, where `f_e` is the
/// fraction of the tokens routed to expert `e` (held constant: the routing is discrete).
fn balance_loss(probs: &Tensor, routes: &[Vec<u32>]) -> Result<Tensor> {
    let (tokens, experts) = probs.dims2()?;
    let fractions: Vec<f32> = routes
        .iter()
        .map(|r| r.len() as f32 / tokens as f32)
        .collect();
    let fractions = Tensor::from_vec(fractions, experts, probs.device())?;
    let mean_probs = probs.mean(0)?; // (E)
    Ok(((mean_probs * fractions)?.sum_all()? * experts as f64)?)
}

/// For each expert, the tokens (rows of `probs: (tokens, experts)`) that have it among their
/// `k` most probable experts; ties go to the lower expert index.
fn tokens_per_expert(probs: &[f32], experts: usize, k: usize) -> Vec<Vec<u32>> {
    let mut routes = vec![Vec::new(); experts];
    for (token, row) in probs.chunks(experts).enumerate() {
        let mut order: Vec<usize> = (0..experts).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        for &e in &order[..k.min(experts)] {
            routes[e].push(token as u32);
        }
    }
    routes
}

/// The feed-forward part of a block.
#[derive(Debug, Clone)]
pub enum FeedForward {
    Dense(GatedMlp),
    Experts(SparseMoe),
}

impl FeedForward {
    /// The linear layers of the MLP or of every expert (the router stays as loaded: it is
    /// small, and rounding its logits would move tokens between experts).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            FeedForward::Dense(mlp) => mlp.linears_mut(),
            FeedForward::Experts(moe) => moe
                .experts
                .iter_mut()
                .flat_map(GatedMlp::linears_mut)
                .collect(),
        }
    }

    /// `x: (..., hidden)` → `(..., hidden)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            FeedForward::Dense(mlp) => mlp.forward(x),
            FeedForward::Experts(moe) => moe.forward(x),
        }
    }

    /// [`FeedForward::forward`], with the load-balancing loss of a mixture of experts
    /// (`None` for a dense MLP).
    pub fn forward_with_balance_loss(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        match self {
            FeedForward::Dense(mlp) => Ok((mlp.forward(x)?, None)),
            FeedForward::Experts(moe) => {
                let (y, aux) = moe.forward_with_balance_loss(x)?;
                Ok((y, Some(aux)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use std::collections::HashMap;

    #[test]
    fn each_token_goes_to_its_k_most_probable_experts() {
        let probs = [
            0.1, 0.5, 0.3, 0.1, // token 0: experts 1, 2
            0.4, 0.1, 0.1, 0.4, // token 1: a tie, experts 0, 3
            0.2, 0.2, 0.5, 0.1, // token 2: expert 2, then the tie 0/1 goes to 0
        ];
        assert_eq!(
            tokens_per_expert(&probs, 4, 2),
            vec![vec![1, 2], vec![0], vec![0, 2], vec![1]]
        );
    }

    /// Values in [-0.5, 0.5) that differ from entry to entry.
    fn filler(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104729) % 1000) as f32 / 1000.0 - 0.5)
            .collect()
    }

    fn var(data: Vec<f32>, shape: &[usize]) -> Var {
        Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu).unwrap()).unwrap()
    }

    const HIDDEN: usize = 6;
    const TOKENS: usize = 7;

    /// Four experts, two per token, on trainable weights (returned by name too).
    fn moe() -> (SparseMoe, Vec<(String, Var)>) {
        let (inter, experts) = (10, 4);
        let mut vars = vec![(
            "router.weight".to_string(),
            var(filler(experts * HIDDEN, 1), &[experts, HIDDEN]),
        )];
        for e in 0..experts {
            for (name, shape) in [
                ("gate_proj", [inter, HIDDEN]),
                ("up_proj", [inter, HIDDEN]),
                ("down_proj", [HIDDEN, inter]),
            ] {
                let data = filler(inter * HIDDEN, 10 * e + name.len());
                vars.push((format!("experts.{e}.{name}.weight"), var(data, &shape)));
            }
        }
        let tensors: HashMap<String, Tensor> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        (
            SparseMoe::load(&vb, HIDDEN, inter, experts, 2).unwrap(),
            vars,
        )
    }

    /// Every expert on every token, weighted by its probability where chosen and by a
    /// constant zero elsewhere: `x: (tokens, hidden)`.
    fn dense_mixture(moe: &SparseMoe, x: &Tensor) -> Tensor {
        let experts = moe.experts.len();
        let probs = candle_nn::ops::softmax(&moe.router.forward(x).unwrap(), D::Minus1).unwrap();
        let routes = tokens_per_expert(&f32_vec(&probs).unwrap(), experts, moe.top_k);
        let mut out = x.zeros_like().unwrap();
        for (e, expert) in moe.experts.iter().enumerate() {
            let chosen: Vec<f32> = (0..TOKENS as u32)
                .map(|t| f32::from(u8::from(routes[e].contains(&t))))
                .collect();
            let mask = Tensor::from_vec(chosen, (TOKENS, 1), &Device::Cpu).unwrap();
            let gate = (probs.narrow(1, e, 1).unwrap() * mask).unwrap();
            let y = expert.forward(x).unwrap().broadcast_mul(&gate).unwrap();
            out = (out + y).unwrap();
        }
        out
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b) = (f32_vec(a).unwrap(), f32_vec(b).unwrap());
        a.iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
    }

    /// The sparse block equals the dense formula, outputs and gradients alike (with
    /// respect to the input, the router and every expert).
    #[test]
    fn sparse_mixture_equals_the_dense_formula_and_its_gradients() {
        let (moe, vars) = moe();
        let x = var(filler(TOKENS * HIDDEN, 99), &[TOKENS, HIDDEN]);
        let sparse = moe.forward(x.as_tensor()).unwrap();
        let dense = dense_mixture(&moe, x.as_tensor());
        assert!(max_diff(&sparse, &dense) < 1e-6);

        let proj =
            Tensor::from_vec(filler(TOKENS * HIDDEN, 5), (TOKENS, HIDDEN), &Device::Cpu).unwrap();
        let grads = |out: &Tensor| {
            (out * &proj)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (gs, gd) = (grads(&sparse), grads(&dense));
        for (name, v) in vars.iter().chain([("input".to_string(), x)].iter()) {
            let (a, b) = (gs.get(v.as_tensor()), gd.get(v.as_tensor()));
            let (a, b) = (a.expect(name), b.expect(name));
            assert!(max_diff(a, b) < 1e-6, "{name}");
            assert!(
                f32_vec(a).unwrap().iter().any(|&g| g != 0.0),
                "{name}: zero"
            );
        }
    }

    fn tensor(data: Vec<f32>, shape: &[usize]) -> Tensor {
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// `mamba_ssm`'s fused `fc1` stacks `[up | gate]`: a fused MLP made of a separate one's
    /// weights computes the same, and one with the halves swapped does not.
    #[test]
    fn fused_mlp_equals_separate_projections() {
        let inter = 10;
        let gate = tensor(filler(inter * HIDDEN, 1), &[inter, HIDDEN]);
        let up = tensor(filler(inter * HIDDEN, 2), &[inter, HIDDEN]);
        let down = tensor(filler(HIDDEN * inter, 3), &[HIDDEN, inter]);
        let vb = |pairs: Vec<(&str, Tensor)>| {
            let map: HashMap<String, Tensor> =
                pairs.into_iter().map(|(n, t)| (n.to_string(), t)).collect();
            VarBuilder::from_tensors(map, DType::F32, &Device::Cpu)
        };
        let separate = vb(vec![
            ("gate_proj.weight", gate.clone()),
            ("up_proj.weight", up.clone()),
            ("down_proj.weight", down.clone()),
        ]);
        let fused = |first: &Tensor, second: &Tensor| {
            let fc1 = Tensor::cat(&[first, second], 0).unwrap();
            let vb = vb(vec![("fc1.weight", fc1), ("fc2.weight", down.clone())]);
            GatedMlp::load_fused(&vb, HIDDEN, inter).unwrap()
        };
        let x = tensor(filler(TOKENS * HIDDEN, 4), &[TOKENS, HIDDEN]);
        let want = GatedMlp::load(&separate, HIDDEN, inter)
            .unwrap()
            .forward(&x)
            .unwrap();
        assert!(max_diff(&fused(&up, &gate).forward(&x).unwrap(), &want) < 1e-6);
        assert!(max_diff(&fused(&gate, &up).forward(&x).unwrap(), &want) > 1e-3);
    }

    /// The load-balancing loss is `k` for a uniform router whatever the routing, nears `E`
    /// when every token goes to the same expert with certainty, and its derivative along
    /// the router's weight matches finite differences while the routing holds.
    #[test]
    fn balance_loss_measures_imbalance_and_has_the_right_gradient() {
        let (moe, vars) = moe(); // 4 experts, 2 per token
        let router = &vars[0].1;
        let base = f32_vec(router.as_tensor()).unwrap();
        let mut rows = filler(TOKENS * HIDDEN, 99);
        for token in rows.chunks_mut(HIDDEN) {
            token[0] = 1.0; // a feature every token has
        }
        let x = tensor(rows, &[TOKENS, HIDDEN]);
        let aux = |w: &[f32]| {
            router.set(&tensor(w.to_vec(), &[4, HIDDEN])).unwrap();
            let (_, aux) = moe.forward_with_balance_loss(&x).unwrap();
            (aux.to_scalar::<f32>().unwrap() as f64, aux)
        };
        let (uniform, _) = aux(&[0.0; 4 * HIDDEN]);
        assert!((uniform - 2.0).abs() < 1e-6, "uniform router: {uniform}");
        let mut all_to_first = [0.0; 4 * HIDDEN];
        all_to_first[0] = 50.0;
        let (skewed, _) = aux(&all_to_first);
        assert!((skewed - 4.0).abs() < 1e-4, "one certain expert: {skewed}");

        let routes_at = |w: &[f32]| {
            router.set(&tensor(w.to_vec(), &[4, HIDDEN])).unwrap();
            let probs = candle_nn::ops::softmax(&moe.router.forward(&x).unwrap(), D::Minus1);
            tokens_per_expert(&f32_vec(&probs.unwrap()).unwrap(), 4, 2)
        };
        let (value, aux_tensor) = aux(&base);
        assert!(value > 2.0, "an uneven router: {value}");
        let grad = f32_vec(
            aux_tensor
                .backward()
                .unwrap()
                .get(router.as_tensor())
                .unwrap(),
        )
        .unwrap();
        let direction = filler(base.len(), 7);
        let analytic: f64 = grad
            .iter()
            .zip(&direction)
            .map(|(g, d)| (g * d) as f64)
            .sum();
        let eps = 1e-3f32;
        let shifted = |e: f32| -> Vec<f32> {
            base.iter()
                .zip(&direction)
                .map(|(b, d)| b + e * d)
                .collect()
        };
        let routes = routes_at(&base);
        for e in [-2.0 * eps, -eps, eps, 2.0 * eps] {
            assert_eq!(routes_at(&shifted(e)), routes, "the routing changed at {e}");
        }
        let at = |e: f32| aux(&shifted(e)).0;
        let numeric =
            (at(-2.0 * eps) - 8.0 * at(-eps) + 8.0 * at(eps) - at(2.0 * eps)) / (12.0 * eps as f64);
        assert!(
            (numeric - analytic).abs() <= 1e-3 + 1e-2 * analytic.abs(),
            "autograd {analytic}, finite differences {numeric}"
        );
        assert!(
            analytic.abs() > 1e-4,
            "a vanishing derivative checks nothing"
        );
    }
}
