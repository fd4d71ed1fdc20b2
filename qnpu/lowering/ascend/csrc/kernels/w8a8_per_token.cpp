// W8A8 per-token kernel for Atlas A2: int8 x int8 -> int32 (L0C) -> per-channel x per-token dequant.
//
// Composition (docs/architecture.md, "CATLASS kernels"): the same CATLASS blocks as example
// 12_quant_matmul (QuantMatmulMultiStageWorkspace kernel, MmadAtlasA2PreloadAsyncWithCallback
// block, EpilogueAtlasA2PerTokenDequant epilogue), instantiated with float32 weight / per-token
// scales (the epilogue's float specialisation) and an fp16 or bf16 output. Numerics:
// lowering/ascend/kernel_model.py::w8a8_per_token.
#include "catlass/arch/arch.hpp"
#include "catlass/catlass.hpp"
#include "catlass/epilogue/block/block_epilogue.hpp"
#include "catlass/epilogue/dispatch_policy.hpp"
#include "catlass/epilogue/tile/tile_broadcast_mul.hpp"
#include "catlass/epilogue/tile/tile_broadcast_one_blk.hpp"
#include "catlass/epilogue/tile/tile_swizzle.hpp"
#include "catlass/gemm/block/block_mmad.hpp"
#include "catlass/gemm/block/block_swizzle.hpp"
#include "catlass/gemm/device/device_gemm.hpp"
#include "catlass/gemm/dispatch_policy.hpp"
#include "catlass/gemm/gemm_type.hpp"
#include "catlass/gemm/kernel/quant_matmul_multistage_workspace.hpp"
#include "catlass/layout/layout.hpp"

#include "qnpu_catlass.h"

namespace qnpu {
using namespace Catlass;

// Tiles (kernel_model.W8A8_TILING): a 128 x 256 int32 block fills L0C (128 KiB); two L1 stages of
// A (128 x 512) and B (512 x 256) take 384 of 512 KiB; L0 K = 128 double-buffers L0A / L0B.
using L1TileShape = GemmShape<128, 256, 512>;
using L0TileShape = GemmShape<128, 256, 128>;
using EpilogueTileShape = MatrixShape<32, 256>;
constexpr uint32_t WORKSPACE_STAGES = 2;

using ArchTag = Arch::AtlasA2;
using MmadPolicy = Gemm::MmadAtlasA2PreloadAsyncWithCallback<
    /*preload*/ 1, /*l1*/ 2, /*l0A*/ 2, /*l0B*/ 2, /*l0C*/ 1, /*unitFlag*/ false, /*shuffleK*/ true>;
using AType = Gemm::GemmType<int8_t, layout::RowMajor>;
using BType = Gemm::GemmType<int8_t, layout::RowMajor>;      // the lowered weight is (k, n)
using CType = Gemm::GemmType<int32_t, layout::RowMajor>;
using BlockMmad = Gemm::Block::BlockMmad<MmadPolicy, L1TileShape, L0TileShape, AType, BType, CType>;

using ScaleType = Gemm::GemmType<float, layout::VectorLayout>;
using PerTokenScaleType = Gemm::GemmType<float, layout::VectorLayout>;
using FloatTile = Gemm::GemmType<float, layout::RowMajor>;

template <class ElementD, uint32_t SWIZZLE_DIRECTION>
struct W8A8PerToken {
    using DType = Gemm::GemmType<ElementD, layout::RowMajor>;
    using TileRowBroadcastMul = Epilogue::Tile::TileRowBroadcastMul<ArchTag, FloatTile, EpilogueTileShape>;
    using TileBroadcastOneBlk = Epilogue::Tile::TileBroadcastOneBlk<ArchTag, FloatTile, EpilogueTileShape::ROW>;
    using TileOneBlkColumnBroadcastMul =
        Epilogue::Tile::TileOneBlkColumnBroadcastMul<ArchTag, FloatTile, EpilogueTileShape>;
    using TileCopy = Epilogue::Tile::TileCopy<ArchTag, CType, ScaleType, PerTokenScaleType, DType>;
    using BlockEpilogue = Epilogue::Block::BlockEpilogue<
        Epilogue::EpilogueAtlasA2PerTokenDequant<2>, CType, ScaleType, PerTokenScaleType, DType,
        TileRowBroadcastMul, TileBroadcastOneBlk, TileOneBlkColumnBroadcastMul, TileCopy,
        Epilogue::Tile::EpilogueHorizontalTileSwizzle>;
    using BlockScheduler = Gemm::Block::GemmIdentityBlockSwizzle<3, SWIZZLE_DIRECTION>;
    using Kernel = Gemm::Kernel::QuantMatmulMultiStageWorkspace<BlockMmad, BlockEpilogue, BlockScheduler,
                                                                WORKSPACE_STAGES>;
    using Adapter = Gemm::Device::DeviceGemm<Kernel>;

    static typename Kernel::Arguments Arguments(const QuantMatmulArgs& a, uint32_t cores)
    {
        return {GemmCoord{a.m, a.n, a.k}, cores, a.x, a.w, a.scale, a.perTokenScale, a.y};
    }
    static void Run(const QuantMatmulArgs& a, uint8_t* workspace, uint32_t cores, aclrtStream stream)
    {
        Adapter op;
        auto args = Arguments(a, cores);
        op.Initialize(args, workspace);
        op(stream, cores);
    }
};

size_t W8A8PerTokenWorkspace(const QuantMatmulArgs& a, uint32_t cores)
{
    // every instantiation needs the same int32 staging: M x N x cores x stages
    return W8A8PerToken<half, 0>::Kernel::GetWorkspaceSize(W8A8PerToken<half, 0>::Arguments(a, cores));
}

void RunW8A8PerToken(const QuantMatmulArgs& a, uint8_t* workspace, uint32_t cores, aclrtStream stream)
{
    // example 12's swizzle choice: walk along the longer output dimension
    const bool mLonger = a.m > a.n;
    if (a.out == OutDtype::BF16) {
        mLonger ? W8A8PerToken<bfloat16_t, 0>::Run(a, workspace, cores, stream)
                : W8A8PerToken<bfloat16_t, 1>::Run(a, workspace, cores, stream);
    } else {
        mLonger ? W8A8PerToken<half, 0>::Run(a, workspace, cores, stream)
                : W8A8PerToken<half, 1>::Run(a, workspace, cores, stream);
    }
}

}  // namespace qnpu
