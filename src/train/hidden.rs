//! Hidden-state distillation: teacher layer -> student layer pairs, each through a
//! learned linear projection from the student's width to the teacher's (identity when
//! the widths agree, else normal(0, 1/sqrt(width)) — the xavier scale), trained with the
//! student and saved with each checkpoint (`checkpoint::PROJECTIONS_FILE`).
use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

use crate::losses::{hidden_loss, HiddenLoss};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HiddenMap {
    pub teacher_layer: usize,
    pub student_layer: usize,
}

impl std::str::FromStr for HiddenMap {
    type Err = anyhow::Error;
    /// `T:S`, e.g. `14:6` maps teacher hidden state 14 to student hidden state 6.
    fn from_str(s: &str) -> Result<Self> {
        let (t, st) = s.split_once(':').with_context(|| format!("hidden map {s:?} is not TEACHER:STUDENT"))?;
        Ok(HiddenMap { teacher_layer: t.trim().parse()?, student_layer: st.trim().parse()? })
    }
}

pub struct HiddenDistill {
    pub maps: Vec<HiddenMap>,
    pub weight: f64,
    pub loss: HiddenLoss,
    pub vs: nn::VarStore,
    projections: Vec<Tensor>,
}

fn projection_name(m: &HiddenMap) -> String {
    format!("projection_{}_{}", m.teacher_layer, m.student_layer)
}

impl HiddenDistill {
    pub fn new(
        maps: Vec<HiddenMap>,
        weight: f64,
        loss: HiddenLoss,
        (teacher_width, student_width): (usize, usize),
        device: Device,
    ) -> Self {
        let vs = nn::VarStore::new(device);
        let (t, s) = (teacher_width as i64, student_width as i64);
        let projections = maps
            .iter()
            .map(|m| {
                let init = if t == s {
                    Tensor::eye(t, (Kind::Float, device))
                } else {
                    Tensor::randn([t, s], (Kind::Float, device)) / (s as f64).sqrt()
                };
                vs.root().add(&projection_name(m), init, true)
            })
            .collect();
        HiddenDistill { maps, weight, loss, vs, projections }
    }

    pub fn student_layers(&self) -> Vec<usize> {
        self.maps.iter().map(|m| m.student_layer).collect()
    }

    pub fn teacher_layers(&self) -> Vec<usize> {
        self.maps.iter().map(|m| m.teacher_layer).collect()
    }

    /// Map `slot`'s weighted, scaled loss term for one micro-batch (to backpropagate)
    /// and the unscaled sum of its per-position losses (detached, left on the device
    /// for the log). `states` is the student's hidden state `maps[slot].student_layer`
    /// `[batch, seq, width]`; `teacher` the teacher's `[targets, teacher width]`.
    pub fn slot_loss(
        &self,
        slot: usize,
        states: &Tensor,
        predicting: &Tensor,
        teacher: &Tensor,
        scale: f64,
    ) -> (Tensor, Tensor) {
        let width = states.size()[2];
        let student = states
            .reshape([-1, width])
            .index_select(0, predicting)
            .to_kind(Kind::Float)
            .linear(&self.projections[slot], None::<Tensor>);
        let per = hidden_loss(self.loss, &student, teacher);
        let raw = per.detach().sum(Kind::Double);
        (per.sum(Kind::Float) * (scale * self.weight), raw)
    }

    /// Writes the projections to the safetensors file `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let named: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        crate::model::save::write_tensors(&named, path)
    }

    /// Reads the projections from the safetensors file `path`; every one must be there.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let saved = Tensor::read_safetensors(path).with_context(|| format!("cannot read {}", path.display()))?;
        let _guard = tch::no_grad_guard();
        for (name, mut var) in self.vs.variables() {
            let Some((_, t)) = saved.iter().find(|(n, _)| *n == name) else {
                bail!("{}: no tensor {name}", path.display());
            };
            var.copy_(t);
        }
        Ok(())
    }
}
