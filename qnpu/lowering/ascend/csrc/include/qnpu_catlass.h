// Host-side launch API of qnpu's CATLASS kernels for Atlas A2 (docs/architecture.md, "CATLASS kernels").
// Each function enqueues one kernel on `stream`; pointers are device (GM) addresses, row-major.
#ifndef QNPU_CATLASS_H
#define QNPU_CATLASS_H

#include <cstddef>
#include <cstdint>
#include <acl/acl.h>

namespace qnpu {

enum class OutDtype : uint32_t { FP16 = 0, BF16 = 1 };

struct QuantMatmulArgs {
    uint32_t m = 0, n = 0, k = 0;
    uint32_t groupSize = 0;            // w4a8 only: 0 = per channel, else a multiple of 32 dividing k
    OutDtype out = OutDtype::FP16;
    uint8_t* x = nullptr;              // int8 (m, k): per-token dynamic-quant codes
    uint8_t* w = nullptr;              // int8 (k, n), or int4 pairs (k, n/2), low nibble first
    uint8_t* scale = nullptr;          // float32 (n,), or (k/groupSize, n) per group
    uint8_t* perTokenScale = nullptr;  // float32 (m,)
    uint8_t* bias = nullptr;           // float32 (n,) or nullptr
    uint8_t* y = nullptr;              // fp16 / bf16 (m, n)
};

// Bytes of device workspace the launch needs (allocate before calling Run*).
size_t W8A8PerTokenWorkspace(const QuantMatmulArgs& args, uint32_t aicCoreNum);
size_t W4A8Workspace(const QuantMatmulArgs& args, uint32_t aicCoreNum);

void RunW8A8PerToken(const QuantMatmulArgs& args, uint8_t* workspace, uint32_t aicCoreNum, aclrtStream stream);
void RunW4A8(const QuantMatmulArgs& args, uint8_t* workspace, uint32_t aicCoreNum, aclrtStream stream);

}  // namespace qnpu

#endif  // QNPU_CATLASS_H
