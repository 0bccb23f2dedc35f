//! A max pool over windows without padding, swapped into tract's graphs in place of its own.
//!
//! Why: tract 0.23.9 takes a vectorised path only for 2x2 windows at stride 1; the common 2x2 at
//! stride 2 (every classic CNN) falls to a per-pixel loop with bounds checks on every tap, and took
//! a third of our bench CNN's time at batch 1 (0.46 of 1.38 ms, `examples/tract_profile.rs`).
//! Without padding no tap can fall outside the image, so the loop here has no checks at all.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{MaxPool, PaddingSpec};
use tract_onnx::tract_core::ops::nn::DataFormat;

/// Max over `kernel` windows moved by `stride`, on f32 NCHW images, no padding, no dilation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct WindowMaxPool {
    kernel: [usize; 2],
    stride: [usize; 2],
}

impl WindowMaxPool {
    /// The replacement for tract's `MaxPool`, when it is one this op computes the same way.
    fn for_tract(pool: &MaxPool, input: &TypedFact) -> Option<WindowMaxPool> {
        let spec = &pool.pool_spec;
        let no_padding = match &spec.padding {
            PaddingSpec::Valid => true,
            PaddingSpec::Explicit(before, after) => before.iter().chain(after).all(|&p| p == 0),
            // ceil_mode adds a partial window at the end only where the window does not fit evenly.
            PaddingSpec::ExplicitOnnxPool(before, after, ceil) => before.iter().chain(after).all(|&p| p == 0) && !ceil,
            PaddingSpec::SameUpper | PaddingSpec::SameLower => false,
        };
        let undilated = spec.dilations.as_ref().is_none_or(|d| d.iter().all(|&d| d == 1));
        let kernel: [usize; 2] = spec.kernel_shape.as_slice().try_into().ok()?;
        let stride: [usize; 2] = match &spec.strides {
            Some(s) => s.as_slice().try_into().ok()?,
            None => [1, 1],
        };
        let plain_image = input.rank() == 4
            && input.shape.iter().skip(1).all(|d| d.as_i64().is_some())
            && input.shape[2].as_i64().is_some_and(|h| h >= kernel[0] as i64)
            && input.shape[3].as_i64().is_some_and(|w| w >= kernel[1] as i64);
        (pool.with_index_outputs.is_none()
            && spec.data_format == DataFormat::NCHW
            && input.datum_type == f32::datum_type()
            && no_padding
            && undilated
            && plain_image
            && kernel.iter().chain(&stride).all(|&k| k >= 1))
        .then_some(WindowMaxPool { kernel, stride })
    }

    fn output_hw(&self, h: usize, w: usize) -> [usize; 2] {
        [(h - self.kernel[0]) / self.stride[0] + 1, (w - self.kernel[1]) / self.stride[1] + 1]
    }
}

impl Op for WindowMaxPool {
    fn name(&self) -> StaticName {
        "FabricWindowMaxPool".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("kernel {:?}, stride {:?}", self.kernel, self.stride)])
    }

    op_as_typed_op!();
}

impl EvalOp for WindowMaxPool {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let &[n, c, h, w] = input.shape() else {
            bail!("max pool wants a 4-dimensional input, got {:?}", input.shape())
        };
        let [oh, ow] = self.output_hw(h, w);
        let src = input.try_as_plain_ram()?;
        let src = src.as_slice::<f32>()?;
        let mut out = vec![0f32; n * c * oh * ow];
        let [kh, kw] = self.kernel;
        let [sh, sw] = self.stride;
        for (plane_in, plane_out) in src.chunks_exact(h * w).zip(out.chunks_exact_mut(oh * ow)) {
            for (oy, row_out) in plane_out.chunks_exact_mut(ow).enumerate() {
                let top = oy * sh;
                if (kh, kw, sw) == (2, 2, 2) {
                    // The common case, written out so the compiler sees two whole rows.
                    let r0 = &plane_in[top * w..][..2 * ow];
                    let r1 = &plane_in[(top + 1) * w..][..2 * ow];
                    for ((o, a), b) in row_out.iter_mut().zip(r0.chunks_exact(2)).zip(r1.chunks_exact(2)) {
                        *o = a[0].max(a[1]).max(b[0].max(b[1]));
                    }
                    continue;
                }
                for (ox, o) in row_out.iter_mut().enumerate() {
                    let left = ox * sw;
                    let mut m = f32::MIN;
                    for ky in 0..kh {
                        for &v in &plane_in[(top + ky) * w + left..][..kw] {
                            m = m.max(v);
                        }
                    }
                    *o = m;
                }
            }
        }
        Ok(tvec!(Tensor::from_shape(&[n, c, oh, ow], &out)?.into_tvalue()))
    }
}

impl TypedOp for WindowMaxPool {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = &inputs[0].shape;
        let (Some(h), Some(w)) = (shape[2].as_i64(), shape[3].as_i64()) else {
            bail!("max pool wants known image sizes, got {shape:?}")
        };
        let [oh, ow] = self.output_hw(h as usize, w as usize);
        let out: TVec<TDim> = tvec![shape[0].clone(), shape[1].clone(), oh.to_dim(), ow.to_dim()];
        Ok(tvec!(f32::fact(out)))
    }

    as_op!();
}

/// Replaces each of tract's max pools that [`WindowMaxPool`] computes the same way; returns how many.
pub(super) fn swap_max_pools(model: &mut TypedModel) -> TractResult<usize> {
    let candidates: Vec<(usize, WindowMaxPool)> = model
        .nodes()
        .iter()
        .filter_map(|node| {
            let pool = node.op_as::<MaxPool>()?;
            let input = model.outlet_fact(*node.inputs.first()?).ok()?;
            Some((node.id, WindowMaxPool::for_tract(pool, input)?))
        })
        .collect();
    let swapped = candidates.len();
    for (id, op) in candidates {
        let node = model.node(id).clone();
        TypedModelPatch::replace_single_op(model, &node, &node.inputs, op)?.apply(model)?;
    }
    Ok(swapped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::cnn::PoolSpec;

    /// A model of one tract max pool over an f32 [n, c, h, w] input.
    fn pool_model(shape: [usize; 4], kernel: [usize; 2], stride: [usize; 2], padding: PaddingSpec) -> TypedModel {
        let mut model = TypedModel::default();
        let input = model.add_source("input", f32::fact(shape)).expect("source");
        let spec = PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: kernel.into_iter().collect(),
            padding,
            dilations: None,
            strides: Some(stride.into_iter().collect()),
            input_channels: shape[1],
            output_channels: shape[1],
        };
        let out =
            model.wire_node("pool", MaxPool { pool_spec: spec, with_index_outputs: None }, &[input]).expect("pool");
        model.select_output_outlets(&out).expect("outputs");
        model
    }

    fn run(model: TypedModel, input: &Tensor) -> Tensor {
        let plan = model.into_runnable().expect("plan");
        plan.run(tvec!(input.clone().into_tvalue())).expect("run").remove(0).into_tensor()
    }

    #[test]
    fn computes_what_tracts_max_pool_computes() {
        let zero = || PaddingSpec::ExplicitOnnxPool(tvec![0, 0], tvec![0, 0], false);
        #[rustfmt::skip]
        let cases: Vec<(&str, [usize; 4], [usize; 2], [usize; 2], PaddingSpec)> = vec![
            ("2x2 stride 2, even image", [2, 3, 8, 8], [2, 2], [2, 2], zero()),
            ("2x2 stride 2, odd image: last row and column dropped", [1, 2, 7, 9], [2, 2], [2, 2], zero()),
            ("3x3 stride 2", [1, 4, 9, 11], [3, 3], [2, 2], PaddingSpec::Valid),
            ("2x2 stride 1 (overlapping windows)", [1, 2, 5, 6], [2, 2], [1, 1], zero()),
            ("non-square kernel and stride", [2, 1, 6, 10], [2, 3], [1, 2], zero()),
            ("1x1 window", [1, 2, 3, 3], [1, 1], [1, 1], zero()),
            ("window as large as the image", [1, 3, 4, 4], [4, 4], [1, 1], zero()),
        ];
        for (label, shape, kernel, stride, padding) in cases {
            let n: usize = shape.iter().product();
            // Negative values too, so a max that starts at zero would be caught.
            let data: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
            let input = Tensor::from_shape(&shape, &data).expect("input");
            let theirs = run(pool_model(shape, kernel, stride, padding.clone()), &input);
            let mut model = pool_model(shape, kernel, stride, padding);
            assert_eq!(swap_max_pools(&mut model).expect("swap"), 1, "{label}: swapped");
            let ours = run(model, &input);
            assert_eq!(ours.shape(), theirs.shape(), "{label}: shape");
            assert_eq!(ours.as_bytes(), theirs.as_bytes(), "{label}");
        }
    }

    #[test]
    fn leaves_pools_it_does_not_compute_to_tract() {
        #[rustfmt::skip]
        let cases: Vec<(&str, PaddingSpec)> = vec![
            ("explicit padding", PaddingSpec::ExplicitOnnxPool(tvec![1, 1], tvec![1, 1], false)),
            ("ceil mode", PaddingSpec::ExplicitOnnxPool(tvec![0, 0], tvec![0, 0], true)),
            ("same upper", PaddingSpec::SameUpper),
        ];
        for (label, padding) in cases {
            let mut model = pool_model([1, 2, 7, 7], [2, 2], [2, 2], padding);
            assert_eq!(swap_max_pools(&mut model).expect("swap"), 0, "{label}");
        }
    }
}
