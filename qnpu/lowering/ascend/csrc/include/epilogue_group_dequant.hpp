// qnpu's per-group dequantization epilogue (AIV) for the dense W4A8 kernel on Atlas A2.
//
// For one output block (M1 x N1), called once per K group g in ascending order with that group's
// int32 block result C_g (docs/architecture.md, "CATLASS kernels"):
//     acc  = (g == 0 ? 0 : acc) + fp32(C_g) * scale[g, n]         (fp32, each step rounded)
//     y    = rint_cast(acc * pertoken[m])                          (after the last group)
// The accumulator stays in UB between calls: each of the two AIV sub-blocks owns half the block's
// rows (64 x 256 fp32 = 64 KiB). Per channel is the same with one group (scale (1, n)). CATLASS has
// no epilogue for K-group dequantization; the tile copies are CATLASS's, the arithmetic is
// AscendC's vector Cast / Mul / Add / Muls. Synchronisation uses full pipe barriers and no event
// IDs (the B prologue's TileCastInt4ToInt8 holds V_MTE2 / MTE3_V 0 and 1 for the whole kernel):
// correct, not yet double-buffered. The buffers start at UB_BASE, above the prologue's UB, so the
// accumulator survives the prologue that runs between two groups.
#ifndef QNPU_EPILOGUE_GROUP_DEQUANT_HPP
#define QNPU_EPILOGUE_GROUP_DEQUANT_HPP

#include "catlass/arch/resource.hpp"
#include "catlass/catlass.hpp"
#include "catlass/epilogue/tile/copy_gm_to_ub.hpp"
#include "catlass/epilogue/tile/copy_ub_to_gm.hpp"
#include "catlass/gemm/gemm_type.hpp"
#include "catlass/gemm_coord.hpp"
#include "catlass/layout/layout.hpp"
#include "catlass/matrix_coord.hpp"

namespace qnpu::epilogue {
using namespace Catlass;

template <class ArchTag_, class ElementD_, uint32_t BLOCK_M, uint32_t BLOCK_N, uint32_t TILE_ROWS, uint32_t UB_BASE = 0>
class GroupDequantEpilogue {
public:
    using ArchTag = ArchTag_;
    using ElementD = ElementD_;
    static constexpr uint32_t HALF_ROWS = BLOCK_M / 2;                   // rows per AIV sub-block
    static_assert(HALF_ROWS % TILE_ROWS == 0, "a sub-block's rows must split into whole tiles");
    static constexpr uint32_t TILE = TILE_ROWS * BLOCK_N;
    static_assert(UB_BASE % BYTE_PER_BLK == 0, "UB buffers must start 32-byte aligned");
    static_assert(sizeof(ElementD) <= sizeof(int32_t), "ubD reuses ubC's bytes");
    // accumulator + int32 C (also the output tile) + fp32 C + the scale row
    static constexpr uint32_t UB_BYTES = HALF_ROWS * BLOCK_N * 4 + TILE * (4 + 4) + BLOCK_N * 4;
    static_assert(UB_BASE + UB_BYTES <= ArchTag::UB_SIZE, "the fp32 accumulator and one tile's buffers must fit UB");

    struct Params {
        __gm__ float* ptrScale{nullptr};          // (k / group, n)
        __gm__ float* ptrPerTokenScale{nullptr};  // (m,)
        __gm__ ElementD* ptrD{nullptr};           // (m, n)
        uint32_t n{0};
    };

    CATLASS_DEVICE
    GroupDequantEpilogue(Arch::Resource<ArchTag> const& resource, Params const& params_) : params(params_)
    {
        size_t offset = UB_BASE;
        ubAcc = resource.ubBuf.template GetBufferByByte<float>(offset);
        offset += HALF_ROWS * BLOCK_N * sizeof(float);
        ubC = resource.ubBuf.template GetBufferByByte<int32_t>(offset);
        // C is consumed by the first Cast (then PIPE_V / PIPE_ALL barriers) before D is written
        ubD = resource.ubBuf.template GetBufferByByte<ElementD>(offset);
        offset += TILE * sizeof(int32_t);
        ubCFp32 = resource.ubBuf.template GetBufferByByte<float>(offset);
        offset += TILE * sizeof(float);
        ubScale = resource.ubBuf.template GetBufferByByte<float>(offset);
    }

    CATLASS_DEVICE
    void operator()(GemmCoord const& blockShape, GemmCoord const& blockCoord, GemmCoord const& actualShape,
                    uint32_t group, uint32_t groups, AscendC::GlobalTensor<int32_t> const& gmBlockC,
                    layout::RowMajor const& layoutBlockC)
    {
        const uint32_t sub = AscendC::GetSubBlockIdx();
        const uint32_t rowBegin = sub * HALF_ROWS;
        if (rowBegin >= actualShape.m()) {
            return;
        }
        const uint32_t rows = (actualShape.m() - rowBegin < HALF_ROWS) ? actualShape.m() - rowBegin : HALF_ROWS;
        const uint32_t cols = actualShape.n();
        const uint32_t n0 = blockCoord.n() * blockShape.n();
        const uint32_t m0 = blockCoord.m() * blockShape.m() + rowBegin;

        // this group's scale row for the block's columns
        AscendC::GlobalTensor<float> gmScale;
        gmScale.SetGlobalBuffer(params.ptrScale + static_cast<size_t>(group) * params.n + n0);
        copyScale(ubScale, gmScale, layout::VectorLayout::MakeLayoutInUb<float>(MakeCoord(cols)),
                  layout::VectorLayout{cols});
        AscendC::PipeBarrier<PIPE_ALL>();

        for (uint32_t r = 0; r < rows; r += TILE_ROWS) {
            const uint32_t tileRows = (rows - r < TILE_ROWS) ? rows - r : TILE_ROWS;
            MatrixCoord tileShape{tileRows, cols};
            layout::RowMajor layoutUb{tileShape, MakeCoord(static_cast<int64_t>(BLOCK_N), 1L)};
            copyC(ubC, gmBlockC[layoutBlockC.GetOffset(MatrixCoord{rowBegin + r, 0})], layoutUb,
                  layoutBlockC.GetTileLayout(tileShape));
            AscendC::PipeBarrier<PIPE_ALL>();
            AscendC::Cast(ubCFp32, ubC, AscendC::RoundMode::CAST_RINT, TILE);
            AscendC::PipeBarrier<PIPE_V>();
            auto acc = ubAcc[r * BLOCK_N];
            for (uint32_t i = 0; i < tileRows; ++i) {              // fp32(C_g) * scale[g, n]
                AscendC::Mul(ubCFp32[i * BLOCK_N], ubCFp32[i * BLOCK_N], ubScale, BLOCK_N);
            }
            AscendC::PipeBarrier<PIPE_V>();
            if (group == 0) {
                AscendC::DataCopy(acc, ubCFp32, TILE);
            } else {
                AscendC::Add(acc, acc, ubCFp32, TILE);
            }
            AscendC::PipeBarrier<PIPE_ALL>();
            if (group + 1 < groups) {
                continue;
            }
            AscendC::GlobalTensor<float> gmPerToken;                // last group: per token, cast, store
            gmPerToken.SetGlobalBuffer(params.ptrPerTokenScale + m0 + r);
            for (uint32_t i = 0; i < tileRows; ++i) {
                AscendC::Muls(acc[i * BLOCK_N], acc[i * BLOCK_N], gmPerToken.GetValue(i), BLOCK_N);
            }
            AscendC::PipeBarrier<PIPE_V>();
            AscendC::Cast(ubD, acc, AscendC::RoundMode::CAST_RINT, TILE);
            AscendC::PipeBarrier<PIPE_ALL>();
            AscendC::GlobalTensor<ElementD> gmD;
            gmD.SetGlobalBuffer(params.ptrD);
            layout::RowMajor layoutD{tileShape, MakeCoord(static_cast<int64_t>(params.n), 1L)};
            copyD(gmD[static_cast<size_t>(m0 + r) * params.n + n0], ubD, layoutD, layoutUb);
            AscendC::PipeBarrier<PIPE_ALL>();
        }
    }

private:
    Params params;
    AscendC::LocalTensor<float> ubAcc, ubCFp32, ubScale;
    AscendC::LocalTensor<int32_t> ubC;
    AscendC::LocalTensor<ElementD> ubD;
    Epilogue::Tile::CopyGm2Ub<ArchTag, Gemm::GemmType<int32_t, layout::RowMajor>> copyC;
    Epilogue::Tile::CopyGm2Ub<ArchTag, Gemm::GemmType<float, layout::VectorLayout>> copyScale;
    Epilogue::Tile::CopyUb2Gm<ArchTag, Gemm::GemmType<ElementD, layout::RowMajor>> copyD;
};

}  // namespace qnpu::epilogue

#endif  // QNPU_EPILOGUE_GROUP_DEQUANT_HPP
