//! Greedy choice, repetition penalty, top-k / top-p, seeding and the sampled distribution.

use mamba_models::sampling::{Sampler, SamplingParams};
use mamba_models::Error;

fn sampler(temperature: f64, top_k: Option<usize>, top_p: Option<f64>, seed: u64) -> Sampler {
    Sampler::new(SamplingParams {
        temperature,
        top_k,
        top_p,
        seed,
        ..SamplingParams::default()
    })
}

fn greedy() -> Sampler {
    Sampler::new(SamplingParams::default())
}

/// A varied row of logits for a vocabulary of `n`.
fn wavy_logits(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 % 101) as f32 * 0.13).sin() * 4.0)
        .collect()
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let exps: Vec<f64> = logits.iter().map(|&l| f64::from(l - max).exp()).collect();
    let total: f64 = exps.iter().sum();
    exps.iter().map(|e| e / total).collect()
}

#[test]
fn defaults_are_greedy_and_valid() {
    let params = SamplingParams::default();
    assert_eq!(params.temperature, 0.0);
    assert_eq!((params.top_k, params.top_p), (None, None));
    assert_eq!((params.repetition_penalty, params.seed), (1.0, 42));
    assert!(params.is_greedy());
    params.validate().unwrap();
}

#[test]
fn greedy_picks_the_argmax() {
    let logits = wavy_logits(500);
    assert_eq!(greedy().sample(&logits, &[]), argmax(&logits));
    assert_eq!(greedy().sample(&[0.1, -3.0, 7.5, 2.0], &[]), 2);
}

#[test]
fn greedy_ties_go_to_the_lowest_id_and_nan_is_ignored() {
    assert_eq!(greedy().sample(&[1.0, 3.0, 3.0, 2.0], &[]), 1);
    assert_eq!(greedy().sample(&[f32::NAN, 1.0, 0.5], &[]), 1);
    assert_eq!(greedy().sample(&[f32::NEG_INFINITY; 3], &[]), 0);
    assert_eq!(greedy().sample(&[], &[]), 0);
}

#[test]
fn repetition_penalty_changes_a_greedy_choice() {
    let logits = [2.0, 1.8, -0.5, 0.3];
    let mut penalised = Sampler::new(SamplingParams {
        repetition_penalty: 1.5,
        ..SamplingParams::default()
    });
    assert_eq!(greedy().sample(&logits, &[0]), 0);
    // 2.0 / 1.5 = 1.33 < 1.8: token 1 wins once token 0 has been seen (repeats count once).
    assert_eq!(penalised.sample(&logits, &[0, 0, 0]), 1);
    // Negative logits are multiplied: -0.5 * 1.5 stays below 0.3 (token 3 is unseen).
    let logits = [-0.5, -0.4];
    assert_eq!(penalised.sample(&logits, &[]), 1);
    assert_eq!(penalised.sample(&logits, &[1]), 0);
    // Out-of-range previous ids are ignored.
    assert_eq!(penalised.sample(&logits, &[7, u32::MAX]), 1);
}

#[test]
fn top_k_one_is_greedy_at_any_temperature() {
    let logits = wavy_logits(1000);
    let expected = argmax(&logits);
    for temperature in [0.1, 1.0, 5.0, 100.0] {
        let mut s = sampler(temperature, Some(1), None, 7);
        for _ in 0..20 {
            assert_eq!(
                s.sample(&logits, &[]),
                expected,
                "temperature {temperature}"
            );
        }
    }
}

#[test]
fn tiny_top_p_is_greedy() {
    let logits = wavy_logits(1000);
    let expected = argmax(&logits);
    let mut s = sampler(1.5, None, Some(1e-9), 3);
    for _ in 0..50 {
        assert_eq!(s.sample(&logits, &[]), expected);
    }
}

#[test]
fn top_k_restricts_the_candidates() {
    let logits = [0.0, 5.0, 4.9, 4.8, 0.1];
    let mut s = sampler(10.0, Some(2), None, 11);
    for _ in 0..200 {
        let id = s.sample(&logits, &[]);
        assert!(id == 1 || id == 2, "{id} is outside the top 2");
    }
}

#[test]
fn top_p_keeps_the_smallest_sufficient_set() {
    // Probabilities 0.5, 0.3, 0.2 (logits are their logs): p = 0.75 keeps ids 0 and 1.
    let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
    let mut s = sampler(1.0, None, Some(0.75), 5);
    let mut seen = [0usize; 3];
    for _ in 0..2000 {
        seen[s.sample(&logits, &[]) as usize] += 1;
    }
    assert_eq!(seen[2], 0);
    assert!(seen[0] > 0 && seen[1] > 0);
}

#[test]
fn a_seed_fixes_the_sequence() {
    let logits = wavy_logits(64);
    let draw = |seed| {
        let mut s = sampler(1.0, Some(40), Some(0.95), seed);
        (0..200).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
    };
    assert_eq!(draw(1234), draw(1234));
    assert_ne!(draw(1234), draw(1235));
}

#[test]
fn sampled_frequencies_match_the_softmax() {
    let logits = [1.0, 2.0, 0.5, 3.0, -1.0, 2.5];
    let expected = softmax(&logits);
    let draws = 40_000;
    let mut s = sampler(1.0, None, None, 2024);
    let mut counts = [0usize; 6];
    for _ in 0..draws {
        counts[s.sample(&logits, &[]) as usize] += 1;
    }
    for (id, (&count, &p)) in counts.iter().zip(&expected).enumerate() {
        let freq = count as f64 / draws as f64;
        // The standard error is below 0.0025; allow about six of them.
        assert!(
            (freq - p).abs() < 0.015,
            "token {id}: frequency {freq}, softmax {p}"
        );
    }
}

#[test]
fn temperature_sharpens_and_flattens() {
    let logits = [0.0, 1.0];
    let frequency_of_1 = |temperature| {
        let mut s = sampler(temperature, None, None, 99);
        (0..20_000).filter(|_| s.sample(&logits, &[]) == 1).count() as f64 / 20_000.0
    };
    let cold = frequency_of_1(0.25); // softmax([0, 4]): 0.982
    let hot = frequency_of_1(4.0); // softmax([0, 0.25]): 0.562
    assert!((cold - 0.982).abs() < 0.01, "{cold}");
    assert!((hot - 0.562).abs() < 0.02, "{hot}");
}

#[test]
fn infinite_and_nan_logits_do_not_break_sampling() {
    let mut s = sampler(1.0, None, None, 8);
    for _ in 0..50 {
        let id = s.sample(&[0.0, f32::INFINITY, 1.0, f32::INFINITY], &[]);
        assert!(id == 1 || id == 3);
        assert_eq!(s.sample(&[f32::NAN, f32::NEG_INFINITY, 0.0], &[]), 2);
    }
    assert_eq!(s.sample(&[f32::NEG_INFINITY; 4], &[]), 0);
    assert_eq!(s.sample(&[], &[]), 0);
}

#[test]
fn validate_rejects_out_of_range_parameters() {
    let base = SamplingParams::default();
    let invalid = [
        SamplingParams {
            temperature: -0.1,
            ..base.clone()
        },
        SamplingParams {
            temperature: f64::NAN,
            ..base.clone()
        },
        SamplingParams {
            temperature: f64::INFINITY,
            ..base.clone()
        },
        SamplingParams {
            top_k: Some(0),
            ..base.clone()
        },
        SamplingParams {
            top_p: Some(0.0),
            ..base.clone()
        },
        SamplingParams {
            top_p: Some(1.5),
            ..base.clone()
        },
        SamplingParams {
            top_p: Some(f64::NAN),
            ..base.clone()
        },
        SamplingParams {
            repetition_penalty: 0.0,
            ..base.clone()
        },
        SamplingParams {
            repetition_penalty: f32::INFINITY,
            ..base.clone()
        },
    ];
    for params in invalid {
        assert!(
            matches!(params.validate(), Err(Error::Input(_))),
            "{params:?}"
        );
    }
    let valid = SamplingParams {
        temperature: 0.8,
        top_k: Some(1),
        top_p: Some(1.0),
        repetition_penalty: 0.9,
        seed: 0,
    };
    valid.validate().unwrap();
    assert!(!valid.is_greedy());
}

#[test]
fn invalid_parameters_never_panic() {
    let logits = wavy_logits(10);
    let params = [
        SamplingParams {
            temperature: f64::NAN,
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: 1.0,
            top_k: Some(0),
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: 1.0,
            top_p: Some(0.0),
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: 1e-300,
            ..SamplingParams::default()
        },
    ];
    for p in params {
        let id = Sampler::new(p.clone()).sample(&logits, &[1, 2, 3]);
        assert!((id as usize) < logits.len(), "{p:?}");
    }
}
