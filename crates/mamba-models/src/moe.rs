//! The feed-forward half of a Jamba block: a gated MLP, or a sparse mixture of such MLPs
//! (experts) of which a router picks the top k for each token.
//!
//! ```text
//! MLP(x) = (silu(x W_gate^T) * x W_up^T) W_down^T
//! p      = softmax(x W_router^T)                   over the E experts     (tokens, E)
//! MoE(x) = sum over the k largest p_e of  p_e * MLP_e(x)    (the chosen p_e are not renormalised)
//! ```
//!
//! Each expert runs on the tokens routed to it only. The choice of experts is discrete; the
//! output is differentiable with respect to every weight, the router's through `p_e`.

use crate::error::Result;
use crate::layers::{f32_vec, Linear};
use candle_core::{Tensor, D};
use candle_nn::VarBuilder;

/// `down_proj(silu(gate_proj(x)) * up_proj(x))`, without biases.
#[derive(Debug, Clone)]
pub struct GatedMlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl GatedMlp {
    /// Loads `gate_proj`, `up_proj` `(intermediate, hidden)` and `down_proj` `(hidden, intermediate)`.
    pub fn load(vb: &VarBuilder, hidden: usize, intermediate: usize) -> Result<Self> {
        Ok(GatedMlp {
            gate_proj: Linear::load(vb, "gate_proj", (intermediate, hidden), false)?,
            up_proj: Linear::load(vb, "up_proj", (intermediate, hidden), false)?,
            down_proj: Linear::load(vb, "down_proj", (hidden, intermediate), false)?,
        })
    }

    /// `x: (..., hidden)` → `(..., hidden)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?.silu()?; // (..., intermediate)
        let up = self.up_proj.forward(x)?; // (..., intermediate)
        self.down_proj.forward(&(gate * up)?)
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
        Ok(out.reshape(shape)?)
    }
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
    /// `x: (..., hidden)` → `(..., hidden)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            FeedForward::Dense(mlp) => mlp.forward(x),
            FeedForward::Experts(moe) => moe.forward(x),
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
}
