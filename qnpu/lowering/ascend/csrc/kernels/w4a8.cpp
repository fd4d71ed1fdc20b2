// Dense W4A8 kernel for Atlas A2: per-token int8 activations x int4 weights, per-channel or
// per-group float32 scales (docs/architecture.md, "CATLASS kernels").
//
// Blocks from CATLASS: the int4 -> int8 prologue of example 32_w4a8_matmul
// (Gemm::Tile::TileCastInt4ToInt8, MmadAtlasA2PingPongWithPrologue), with TileCopyWithPrologue so
// the int32 accumulator leaves L0C undequantized, and example 12's per-token dequant epilogue for
// per-channel scales; qnpu's GroupDequantEpilogue for per-group scales. Kernel class:
// include/w4a8_per_token_kernel.hpp. Numerics: lowering/ascend/kernel_model.py::w4a8.
#include "catlass/arch/arch.hpp"
#include "catlass/catlass.hpp"
#include "catlass/detail/kernel_adapter.hpp"
#include "catlass/epilogue/block/block_epilogue.hpp"
#include "catlass/epilogue/dispatch_policy.hpp"
#include "catlass/epilogue/tile/tile_broadcast_mul.hpp"
#include "catlass/epilogue/tile/tile_broadcast_one_blk.hpp"
#include "catlass/epilogue/tile/tile_swizzle.hpp"
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
constexpr uint32_t CAST_COMPUTE_LEN = 24 * 1024;       // example 32's prologue UB chunk (its maximum)

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
using FloatVec = Gemm::GemmType<float, layout::VectorLayout>;
using FloatTile = Gemm::GemmType<float, layout::RowMajor>;

template <class ElementD>
using PerChannelEpilogue = Epilogue::Block::BlockEpilogue<
    Epilogue::EpilogueAtlasA2PerTokenDequant<2>, CType, FloatVec, FloatVec, Gemm::GemmType<ElementD, layout::RowMajor>,
    Epilogue::Tile::TileRowBroadcastMul<ArchTag, FloatTile, EpilogueTileShape>,
    Epilogue::Tile::TileBroadcastOneBlk<ArchTag, FloatTile, EpilogueTileShape::ROW>,
    Epilogue::Tile::TileOneBlkColumnBroadcastMul<ArchTag, FloatTile, EpilogueTileShape>,
    Epilogue::Tile::TileCopy<ArchTag, CType, FloatVec, FloatVec, Gemm::GemmType<ElementD, layout::RowMajor>>,
    Epilogue::Tile::EpilogueHorizontalTileSwizzle>;

template <class ElementD>
using PerGroupEpilogue =
    epilogue::GroupDequantEpilogue<ArchTag, ElementD, L1TileShape::M, L1TileShape::N, EpilogueTileShape::ROW>;

template <class ElementD, bool PER_GROUP, uint32_t SWIZZLE_DIRECTION>
void Run(const QuantMatmulArgs& a, uint8_t* workspace, uint32_t cores, aclrtStream stream)
{
    using Scheduler = Gemm::Block::GemmIdentityBlockSwizzle<3, SWIZZLE_DIRECTION>;
    using Epi = std::conditional_t<PER_GROUP, PerGroupEpilogue<ElementD>, PerChannelEpilogue<ElementD>>;
    using Kernel = kernel::W4A8PerToken<BlockMmad, Epi, Scheduler, PER_GROUP>;
    typename Kernel::Params p;
    p.problemShape = GemmCoord{a.m, a.n, a.k};
    p.groupSize = PER_GROUP ? a.groupSize : a.k;
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
    const bool mLonger = a.m > a.n;
    if (a.groupSize == 0) {
        mLonger ? Run<ElementD, false, 0>(a, workspace, cores, stream) : Run<ElementD, false, 1>(a, workspace, cores, stream);
    } else {
        mLonger ? Run<ElementD, true, 0>(a, workspace, cores, stream) : Run<ElementD, true, 1>(a, workspace, cores, stream);
    }
}
}  // namespace w4a8

size_t W4A8Workspace(const QuantMatmulArgs&, uint32_t cores)
{
    using K = kernel::W4A8PerToken<w4a8::BlockMmad, w4a8::PerChannelEpilogue<half>,
                                   Gemm::Block::GemmIdentityBlockSwizzle<3, 0>, false>;
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
