// PrivateUse1 (NPU) kernels of the qnpu op schemas, backed by qnpu's CATLASS kernels.
//
// Loaded with torch.ops.load_library (qnpu.lowering.ascend.kernels.load); the schemas themselves
// are defined by qnpu.lowering.library (TORCH_LIBRARY "qnpu"), so this library only adds
// implementations (docs/architecture.md, "CATLASS kernels"):
//  * qnpu::npu_quant_matmul: the per-token W8A8 case (int8 x int8 (k, n), float scale (n,),
//    float32 pertoken_scale (m,), fp16 / bf16 output, no offset / groups) runs the W8A8 kernel;
//    every other case is forwarded, argument by argument name, to torch_npu's npu::npu_quant_matmul.
//  * qnpu::w4a8_matmul: the dense W4A8 kernel (per channel or per group).
// A bias is added after the kernel, in fp32, then rounded again (the kernels' epilogues have none).
#include <string>
#include <unordered_map>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>
#include <torch_npu/csrc/core/npu/NPUStream.h>
#include <torch_npu/csrc/framework/OpCommand.h>
#include <tiling/platform/platform_ascendc.h>

#include "qnpu_catlass.h"

namespace {

uint32_t AicCores()
{
    return platform_ascendc::PlatformAscendCManager::GetInstance()->GetCoreNumAic();
}

at::Tensor Workspace(size_t bytes, const at::Tensor& like)
{
    return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

qnpu::OutDtype OutOf(at::ScalarType t)
{
    TORCH_CHECK(t == at::kHalf || t == at::kBFloat16, "qnpu CATLASS kernels write float16 or bfloat16; got ", t);
    return t == at::kHalf ? qnpu::OutDtype::FP16 : qnpu::OutDtype::BF16;
}

uint8_t* Ptr(const at::Tensor& t)
{
    return static_cast<uint8_t*>(t.data_ptr());
}

template <class Launch>
void Enqueue(const char* name, Launch launch)
{
    // the pattern of CATLASS examples/python_extension: run on torch_npu's current stream. With the
    // task queue on, RunOpApiV2 runs the lambda later on torch_npu's dispatch thread, whose current
    // stream is its own default one: take the caller's stream here (stream(false): no queue flush).
    // Only raw pointers are captured: the caching allocator reuses a freed block only for work
    // queued after this launch on the same stream.
    aclrtStream stream = c10_npu::getCurrentNPUStream().stream(false);
    at_npu::native::OpCommand::RunOpApiV2(name, [=]() -> int {
        launch(stream);
        return 0;
    });
}

at::Tensor WithBias(at::Tensor y, const c10::optional<at::Tensor>& bias)
{
    if (!bias.has_value()) {
        return y;
    }
    return (y.to(at::kFloat) + bias->to(at::kFloat)).to(y.scalar_type());
}

// Call torch_npu's op of the same name, filling its (longer) argument list by name.
at::Tensor ForwardToTorchNpu(const char* op, std::unordered_map<std::string, c10::IValue> named)
{
    const c10::OperatorHandle handle = c10::Dispatcher::singleton().findSchemaOrThrow(op, "");
    torch::jit::Stack stack;
    for (const auto& arg : handle.schema().arguments()) {
        auto it = named.find(arg.name());
        if (it != named.end()) {
            stack.push_back(it->second);
        } else {
            TORCH_CHECK(arg.default_value().has_value(), op, ": no value for argument ", arg.name());
            stack.push_back(*arg.default_value());
        }
    }
    handle.callBoxed(stack);
    return stack[0].toTensor();
}

bool IsW8A8PerToken(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& scale,
                    const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& pertoken,
                    const c10::optional<at::Tensor>& bias, at::ScalarType out, const c10::OptionalIntArrayRef& groups)
{
    // an int32 bias belongs in the int32 accumulator, before the dequant: only a float bias (float32 or
    // the output dtype, (n,)) can be added after the kernel
    auto floatBias = [&] {   // called once x2 is known to be 2-d
        return !bias.has_value() ||
               (bias->dim() == 1 && bias->size(0) == x2.size(1) && bias->device() == x1.device() &&
                (bias->scalar_type() == at::kFloat || bias->scalar_type() == out));
    };
    // anything else (mismatched shapes, k == 0, other devices) goes to torch_npu, which raises
    return x1.dim() == 2 && x2.dim() == 2 && x1.scalar_type() == at::kChar && x2.scalar_type() == at::kChar &&
           x1.size(1) == x2.size(0) && x1.size(1) > 0 && scale.dim() == 1 && scale.size(0) == x2.size(1) &&
           (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kBFloat16) && !offset.has_value() &&
           pertoken.has_value() && pertoken->scalar_type() == at::kFloat && pertoken->numel() == x1.size(0) &&
           (out == at::kHalf || out == at::kBFloat16) && !(groups.has_value() && !groups->empty()) &&
           x1.is_contiguous() && x2.is_contiguous() && scale.device() == x1.device() &&
           pertoken->device() == x1.device() && x2.device() == x1.device() && floatBias();
}

at::Tensor QuantMatmul(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& pertoken_scale,
                       const c10::optional<at::Tensor>& bias, c10::optional<at::ScalarType> output_dtype,
                       c10::OptionalIntArrayRef group_sizes)
{
    const at::ScalarType out = output_dtype.value_or(at::kChar);
    if (!IsW8A8PerToken(x1, x2, scale, offset, pertoken_scale, bias, out, group_sizes)) {
        std::unordered_map<std::string, c10::IValue> named{
            {"x1", x1}, {"x2", x2}, {"scale", scale}, {"offset", offset}, {"pertoken_scale", pertoken_scale},
            {"bias", bias}, {"output_dtype", output_dtype}};
        if (group_sizes.has_value()) {
            named.emplace("group_sizes", group_sizes->vec());
        }
        return ForwardToTorchNpu("npu::npu_quant_matmul", named);
    }
    qnpu::QuantMatmulArgs a;
    a.m = x1.size(0);
    a.k = x1.size(1);
    a.n = x2.size(1);
    a.out = OutOf(out);
    at::Tensor scale32 = scale.to(at::kFloat).contiguous();
    at::Tensor tok = pertoken_scale->reshape({-1}).contiguous();
    at::Tensor y = at::empty({x1.size(0), x2.size(1)}, x1.options().dtype(out));
    const uint32_t cores = AicCores();
    at::Tensor ws = Workspace(qnpu::W8A8PerTokenWorkspace(a, cores), x1);
    a.x = Ptr(x1);
    a.w = Ptr(x2);
    a.scale = Ptr(scale32);
    a.perTokenScale = Ptr(tok);
    a.y = Ptr(y);
    uint8_t* wsPtr = Ptr(ws);
    Enqueue("qnpu_w8a8_per_token", [=](aclrtStream s) { qnpu::RunW8A8PerToken(a, wsPtr, cores, s); });
    return WithBias(y, bias);
}

at::Tensor W4A8Matmul(const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& scale,
                      const at::Tensor& pertoken_scale, const c10::optional<at::Tensor>& bias, int64_t group_size,
                      c10::optional<at::ScalarType> output_dtype)
{
    // argument checks mirror qnpu.lowering.ops_w4a8._check (the reference refuses the same inputs)
    TORCH_CHECK(x1.dim() == 2 && x1.scalar_type() == at::kChar, "qnpu.w4a8_matmul: x1 must be 2-d int8");
    TORCH_CHECK(x2.dim() == 2 && x2.scalar_type() == at::kInt && x2.size(0) == x1.size(1),
                "qnpu.w4a8_matmul: x2 must be int32 (k, n/8)");
    const int64_t m = x1.size(0), k = x1.size(1), n = x2.size(1) * 8;
    TORCH_CHECK(k > 0 && k <= 65535 && n > 0 && n <= 65535, "qnpu.w4a8_matmul: k and n must lie in [1, 65535]");
    TORCH_CHECK(group_size == 0 || (group_size > 0 && group_size % 32 == 0 && group_size <= k && k % group_size == 0),
                "qnpu.w4a8_matmul: group_size must be 0 or a multiple of 32 dividing k");
    const int64_t groups = group_size == 0 ? 0 : k / group_size;
    TORCH_CHECK(scale.scalar_type() == at::kFloat &&
                    (group_size == 0 ? scale.dim() == 1 && scale.size(0) == n
                                     : scale.dim() == 2 && scale.size(0) == groups && scale.size(1) == n),
                "qnpu.w4a8_matmul: scale must be float32 (n,) per channel or (k / group_size, n) per group");
    TORCH_CHECK(pertoken_scale.scalar_type() == at::kFloat && pertoken_scale.dim() == 1 && pertoken_scale.size(0) == m,
                "qnpu.w4a8_matmul: pertoken_scale must be float32 (m,)");
    TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == n),
                "qnpu.w4a8_matmul: bias must be float32 (n,)");
    TORCH_CHECK(x2.device() == x1.device() && scale.device() == x1.device() && pertoken_scale.device() == x1.device(),
                "qnpu.w4a8_matmul: all tensors must be on the same device");
    const at::ScalarType out = output_dtype.value_or(at::kHalf);
    qnpu::QuantMatmulArgs a;
    a.m = x1.size(0);
    a.k = k;
    a.n = n;
    a.groupSize = group_size;
    a.out = OutOf(out);
    // int32 words of eight int4 along n are, byte by byte, example 32's pairs (low nibble first)
    at::Tensor x = x1.contiguous();
    at::Tensor w = x2.contiguous();
    at::Tensor scale32 = scale.contiguous();
    at::Tensor tok = pertoken_scale.contiguous();
    at::Tensor y = at::empty({m, n}, x1.options().dtype(out));
    if (m == 0) {
        return y;
    }
    const uint32_t cores = AicCores();
    at::Tensor ws = Workspace(qnpu::W4A8Workspace(a, cores), x1);
    a.x = Ptr(x);
    a.w = Ptr(w);
    a.scale = Ptr(scale32);
    a.perTokenScale = Ptr(tok);
    a.y = Ptr(y);
    uint8_t* wsPtr = Ptr(ws);
    Enqueue("qnpu_w4a8", [=](aclrtStream s) { qnpu::RunW4A8(a, wsPtr, cores, s); });
    return WithBias(y, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(qnpu, PrivateUse1, m)
{
    m.impl("npu_quant_matmul", &QuantMatmul);
    m.impl("w4a8_matmul", &W4A8Matmul);
}
