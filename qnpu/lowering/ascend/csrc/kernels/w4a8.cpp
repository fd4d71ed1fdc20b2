// Dense W4A8 kernel for Atlas A2: per-token int8 activations x int4 weights, per-channel or
// per-group float32 scales (docs/architecture.md, "CATLASS kernels").
//
// Blocks from CATLASS: the int4 -> int8 prologue of example 32_w4a8_matmul
// (Gemm::Tile::TileCastInt4ToInt8, MmadAtlasA2PingPongWithPrologue), with TileCopyWithPrologue so
// the int32 accumulator leaves L0C undequantized; qnpu's GroupDequantEpilogue for per-group scales
// and, with one group of all K, per-channel scales (same fp32 operations in the same order as
// example 12's per-token dequant epilogue, which cannot share the AIV with the prologue: see the
// kernel class). Kernel class: include/w4a8_per_token_kernel.hpp. Numerics:
// lowering/ascend/kernel_model.py::w4a8.
#include "catlass/arch/arch.hpp"
#include "catlass/catlass.hpp"
#include "catlass/detail/kernel_adapter.hpp"
#include "catlass/gemm/block/block_mmad.hpp"
#include "catlass/gemm/block/block_swizzle.hpp"
#include "catlass/gemm/dispatch_policy.hpp"
#include "catlass/gemm/gemm_type.hpp"
#include "catlass/gemm/tile/tile_copy.hpp"
#include "catlass/layout/layout.hpp"

#include "epilogue_group_dequant.hpp"
#include "qnpu_catlass.h"
#include "w4a8_per_token_kernel.hpp"

namespace qnpu {
using namespace Catlass;

// Tiles (kernel_model.W4A8_TILING): as the W8A8 kernel; example 32 uses the same 128 x 256 x 512
// L1 / 128 x 256 x 128 L0 pair for row-major operands.
using L1TileShape = GemmShape<128, 256, 512>;
using L0TileShape = GemmShape<128, 256, 128>;
using EpilogueTileShape = MatrixShape<32, 256>;
// TileCastInt4ToInt8 widens 32 rows of the (K, N1) tile per pass, so it never uses more than
// 32 x N1 elements of its buffers; it holds 7 x COMPUTE_LEN bytes of UB from offset 0 (two stages of
// int4 in, int8 out and a half workspace) for the whole kernel, and the epilogue lives above them.
// Example 32's 24 Ki (168 KiB of UB) would leave no room for the epilogue's fp32 accumulator.
constexpr uint32_t CAST_COMPUTE_LEN = 32 * L1TileShape::N;
constexpr uint32_t PROLOGUE_UB_BYTES = 2 * (CAST_COMPUTE_LEN / 2 + CAST_COMPUTE_LEN + CAST_COMPUTE_LEN * 2);

namespace w4a8 {
using ArchTag = Arch::AtlasA2;
using AType = Gemm::GemmType<int8_t, layout::RowMajor>;
using PrologueSrcType = Gemm::GemmType<AscendC::int4b_t, layout::RowMajor>;   // (k, n), pairs along n
using BType = Gemm::GemmType<int8_t, layout::RowMajor>;
using CType = Gemm::GemmType<int32_t, layout::RowMajor>;
using PrologueB = Gemm::Tile::TileCastInt4ToInt8<ArchTag, PrologueSrcType, BType, CAST_COMPUTE_LEN>;
using TileCopy = Gemm::Tile::TileCopyWithPrologue<ArchTag, AType, BType, CType, void, PrologueB>;
using BlockMmad = Gemm::Block::BlockMmad<Gemm::MmadAtlasA2PingPongWithPrologue<false>, L1TileShape, L0TileShape,
                                         AType, BType, CType, void, TileCopy>;

template <class ElementD>
using DequantEpilogue = epilogue::GroupDequantEpilogue<ArchTag, ElementD, L1TileShape::M, L1TileShape::N,
                                                       EpilogueTileShape::ROW, PROLOGUE_UB_BYTES>;

template <class ElementD, uint32_t SWIZZLE_DIRECTION>
void Run(const QuantMatmulArgs& a, uint8_t* workspace, uint32_t cores, aclrtStream stream)
{
    using Scheduler = Gemm::Block::GemmIdentityBlockSwizzle<3, SWIZZLE_DIRECTION>;
    using Kernel = kernel::W4A8PerToken<BlockMmad, DequantEpilogue<ElementD>, Scheduler>;
    typename Kernel::Params p;
    p.problemShape = GemmCoord{a.m, a.n, a.k};
    p.groupSize = a.groupSize == 0 ? a.k : a.groupSize;     // per channel: one group, scale (1, n)
    p.ptrA = a.x;
    p.layoutA = layout::RowMajor{a.m, a.k};
    p.ptrPrologueB = a.w;
    p.layoutPrologueB = layout::RowMajor{a.k, a.n, (a.n + 1) / 2 * 2};   // example 32's packed (k, n) layout
    p.ptrScale = a.scale;
    p.ptrPerTokenScale = a.perTokenScale;
    p.ptrD = a.y;
    p.ptrWorkspaceB = workspace;
    p.ptrWorkspaceC = workspace + Kernel::WorkspaceB(cores);
    Catlass::KernelAdapter<Kernel><<<cores, nullptr, stream>>>(p);   // as DeviceGemm launches
}

template <class ElementD>
void Dispatch(const QuantMatmulArgs& a, uint8_t* workspace, uint32_t cores, aclrtStream stream)
{
    if (a.m > a.n) {
        Run<ElementD, 0>(a, workspace, cores, stream);
    } else {
        Run<ElementD, 1>(a, workspace, cores, stream);
    }
}
}  // namespace w4a8

size_t W4A8Workspace(const QuantMatmulArgs&, uint32_t cores)
{
    using K = kernel::W4A8PerToken<w4a8::BlockMmad, w4a8::DequantEpilogue<half>,
                                   Gemm::Block::GemmIdentityBlockSwizzle<3, 0>>;
    return K::WorkspaceB(cores) + K::WorkspaceC(cores);
}

void RunW4A8(const QuantMatmulArgs& a, uint8_t* workspace, uint32_t cores, aclrtStream stream)
{
    if (a.out == OutDtype::BF16) {
        w4a8::Dispatch<bfloat16_t>(a, workspace, cores, stream);
    } else {
        w4a8::Dispatch<half>(a, workspace, cores, stream);
    }
}

}  // namespace qnpu
