// Packed-sequence VPG-EA loss reduction in CUDA C++: the twin of kernels/vpgea_loss.py.
//
// For S packed paths (cu_seqlens: (S + 1,), int32) with teacher / student token log-probs q, p: (T,) and advantages
// A: (S,) float32, with Q_i = sum q over path i, P_i = sum p, gate g_i = [A_i > 0] and the per-path weight c_i
// (normalize 0 "sum": scale = 1/S; 1 "token": scale / n_i, 0 for an empty path; 2 "global-token": scale = 1/T):
//
//   loss = sum_i c_i (-A_i Q_i + beta g_i (Q_i - P_i)),  kl = sum_i c_i (Q_i - P_i),  adv_logq = sum_i c_i A_i Q_i,
//   gate_frac = (1/S) sum_i g_i.
//
// Forward: one block per path; threads stride over the path's tokens, a warp-shuffle + shared-memory reduction gives
// Q_i and P_i in fp32, thread 0 writes the path's four contributions to partials (4, S); a fixed-order sum over S
// follows (deterministic, unlike atomics). Backward: the loss is linear in the log-probs, so every token of path i
// gets dq = -g c_i A_i and dp = -g c_i beta g_i; one block per path broadcasts them. The incoming gradient g is read
// on the device (no host sync). Token offsets are 64-bit.
//
// Registered as torch custom ops vpgea::vpgea_loss_fwd_cuda / vpgea::vpgea_loss_bwd_cuda (fake implementations live
// in vpgea/_ext.py). Built on demand by vpgea/_ext.py with torch.utils.cpp_extension.load.

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

namespace vpgea {
namespace {

constexpr int kThreads = 256;  // 8 warps per path: paths are hundreds to thousands of tokens

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of v over the block; the result is valid in thread 0.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = (threadIdx.x < (blockDim.x >> 5)) ? smem[threadIdx.x] : 0.0f;
  if (warp == 0) v = warp_sum(v);
  __syncthreads();  // smem is reused by the next call
  return v;
}

__device__ __forceinline__ float path_weight(int64_t n, float scale, int normalize) {
  if (normalize == 1) return n > 0 ? scale / static_cast<float>(n) : 0.0f;
  return scale;
}

template <typename scalar_t>
__global__ void vpgea_loss_fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ p,
                                      const float* __restrict__ adv, const int32_t* __restrict__ cu,
                                      float* __restrict__ partials, int64_t num_seqs, float beta, float scale,
                                      float inv_s, int normalize) {
  __shared__ float smem[kThreads / 32];
  const int64_t seq = blockIdx.x;
  const int64_t start = cu[seq];
  const int64_t end = cu[seq + 1];
  float acc_q = 0.0f, acc_p = 0.0f;
  for (int64_t t = start + threadIdx.x; t < end; t += blockDim.x) {
    acc_q += static_cast<float>(q[t]);
    acc_p += static_cast<float>(p[t]);
  }
  const float sum_q = block_sum(acc_q, smem);
  const float sum_p = block_sum(acc_p, smem);
  if (threadIdx.x == 0) {
    const float a = adv[seq];
    const float c = path_weight(end - start, scale, normalize);
    const bool gate = a > 0.0f;
    const bool live = c != 0.0f;
    // Select rather than multiply by zero: a -inf log-prob in a zero-weight path must not become NaN.
    const float pg = (live && a != 0.0f) ? -a * sum_q : 0.0f;
    const float kl = live ? sum_q - sum_p : 0.0f;
    partials[seq] = c * (pg + (gate ? beta * kl : 0.0f));
    partials[num_seqs + seq] = c * kl;
    partials[2 * num_seqs + seq] = -c * pg;
    partials[3 * num_seqs + seq] = gate ? inv_s : 0.0f;
  }
}

template <typename scalar_t>
__global__ void vpgea_loss_bwd_kernel(scalar_t* __restrict__ gq, scalar_t* __restrict__ gp,
                                      const float* __restrict__ adv, const int32_t* __restrict__ cu,
                                      const float* __restrict__ grad, float beta, float scale, int normalize) {
  const int64_t seq = blockIdx.x;
  const int64_t start = cu[seq];
  const int64_t end = cu[seq + 1];
  const float a = adv[seq];
  const float g = grad[0];
  const float c = path_weight(end - start, scale, normalize);
  const scalar_t vq = static_cast<scalar_t>(-g * c * a);
  const scalar_t vp = static_cast<scalar_t>(a > 0.0f ? -g * c * beta : 0.0f);
  for (int64_t t = start + threadIdx.x; t < end; t += blockDim.x) {
    gq[t] = vq;
    gp[t] = vp;
  }
}

void check_inputs(const at::Tensor& teacher, const at::Tensor& student, const at::Tensor& adv,
                  const at::Tensor& cu) {
  TORCH_CHECK(teacher.is_cuda() && student.is_cuda() && adv.is_cuda() && cu.is_cuda(),
              "vpgea_loss CUDA op: all tensors must be CUDA tensors");
  TORCH_CHECK(teacher.dim() == 1 && student.dim() == 1, "vpgea_loss CUDA op: log-probs must be 1-D (T,)");
  TORCH_CHECK(teacher.numel() == student.numel(), "vpgea_loss CUDA op: teacher has ", teacher.numel(),
              " tokens, student has ", student.numel());
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(),
              "vpgea_loss CUDA op: teacher and student log-probs must share a dtype");
  TORCH_CHECK(teacher.is_contiguous() && student.is_contiguous() && adv.is_contiguous() && cu.is_contiguous(),
              "vpgea_loss CUDA op: inputs must be contiguous");
  TORCH_CHECK(adv.scalar_type() == at::kFloat, "vpgea_loss CUDA op: advantages must be float32");
  TORCH_CHECK(cu.scalar_type() == at::kInt, "vpgea_loss CUDA op: cu_seqlens must be int32");
  TORCH_CHECK(cu.numel() == adv.numel() + 1, "vpgea_loss CUDA op: cu_seqlens must have S + 1 = ", adv.numel() + 1,
              " entries, got ", cu.numel());
}

}  // namespace

// Returns (4,) float32: loss, kl, adv_logq, gate_frac.
at::Tensor vpgea_loss_fwd_cuda(const at::Tensor& teacher, const at::Tensor& student, const at::Tensor& adv,
                               const at::Tensor& cu, double beta, double scale, int64_t normalize) {
  check_inputs(teacher, student, adv, cu);
  TORCH_CHECK(normalize >= 0 && normalize <= 2, "vpgea_loss CUDA op: normalize must be 0, 1 or 2, got ", normalize);
  const c10::cuda::CUDAGuard guard(teacher.device());
  const int64_t num_seqs = adv.numel();
  if (num_seqs == 0) return at::zeros({4}, adv.options());
  auto partials = at::empty({4, num_seqs}, adv.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, teacher.scalar_type(), "vpgea_loss_fwd_cuda", [&] {
    vpgea_loss_fwd_kernel<scalar_t><<<static_cast<unsigned int>(num_seqs), kThreads, 0, stream>>>(
        teacher.data_ptr<scalar_t>(), student.data_ptr<scalar_t>(), adv.data_ptr<float>(), cu.data_ptr<int32_t>(),
        partials.data_ptr<float>(), num_seqs, static_cast<float>(beta), static_cast<float>(scale),
        1.0f / static_cast<float>(num_seqs), static_cast<int>(normalize));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partials.sum(1);
}

// Returns (d_teacher (T,), d_student (T,)) in the log-probs' dtype. teacher / student only give shape and dtype.
std::tuple<at::Tensor, at::Tensor> vpgea_loss_bwd_cuda(const at::Tensor& grad, const at::Tensor& teacher,
                                                       const at::Tensor& student, const at::Tensor& adv,
                                                       const at::Tensor& cu, double beta, double scale,
                                                       int64_t normalize) {
  check_inputs(teacher, student, adv, cu);
  TORCH_CHECK(grad.is_cuda() && grad.numel() == 1, "vpgea_loss CUDA op: grad must be a one-element CUDA tensor");
  const c10::cuda::CUDAGuard guard(teacher.device());
  auto g = grad.reshape({1}).to(at::kFloat).contiguous();
  auto gq = at::empty_like(teacher);
  auto gp = at::empty_like(student);
  const int64_t num_seqs = adv.numel();
  if (num_seqs == 0 || teacher.numel() == 0) return {gq, gp};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, teacher.scalar_type(), "vpgea_loss_bwd_cuda", [&] {
    vpgea_loss_bwd_kernel<scalar_t><<<static_cast<unsigned int>(num_seqs), kThreads, 0, stream>>>(
        gq.data_ptr<scalar_t>(), gp.data_ptr<scalar_t>(), adv.data_ptr<float>(), cu.data_ptr<int32_t>(),
        g.data_ptr<float>(), static_cast<float>(beta), static_cast<float>(scale), static_cast<int>(normalize));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gq, gp};
}

}  // namespace vpgea

// A fragment: Python-side custom ops (vpgea/logprobs.py) share the "vpgea" namespace.
TORCH_LIBRARY_FRAGMENT(vpgea, m) {
  m.def(
      "vpgea_loss_fwd_cuda(Tensor teacher, Tensor student, Tensor advantages, Tensor cu_seqlens, float beta, "
      "float scale, int normalize) -> Tensor");
  m.def(
      "vpgea_loss_bwd_cuda(Tensor grad, Tensor teacher, Tensor student, Tensor advantages, Tensor cu_seqlens, "
      "float beta, float scale, int normalize) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vpgea, CUDA, m) {
  m.impl("vpgea_loss_fwd_cuda", &vpgea::vpgea_loss_fwd_cuda);
  m.impl("vpgea_loss_bwd_cuda", &vpgea::vpgea_loss_bwd_cuda);
}
