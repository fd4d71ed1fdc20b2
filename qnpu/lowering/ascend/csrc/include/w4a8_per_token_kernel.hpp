// Dense W4A8 kernel class for Atlas A2: per-token int8 activations x int4 weights.
//
// Roles (docs/architecture.md, "CATLASS kernels"):
//  * AIV, prologue: widens each int4 weight tile to int8 into a per-core GM workspace through the
//    BlockMmad's Prologue (CATLASS TileCastInt4ToInt8), as Gemm::Kernel::W4A8Matmul of example
//    32_w4a8_matmul does.
//  * AIC: int8 x int8 block matmuls (MmadAtlasA2PingPongWithPrologue) whose int32 result leaves L0C
//    without dequantization (TileCopyWithPrologue) into a staged int32 workspace, handed over with
//    the cross-core flags of Gemm::Kernel::QuantMatmulMultiStageWorkspace (example 12).
//      - per channel: one block matmul over the whole K;
//      - per group: one block matmul per K group (K of the call = group size).
//  * AIV, epilogue: qnpu's GroupDequantEpilogue (fp32 accumulation of scale[g, n] * C_g, then per
//    token); per channel is its one-group case. CATLASS's EpilogueAtlasA2PerTokenDequant cannot
//    share the AIV with the prologue: both take UB from offset 0 and pre-set the same V_MTE2 /
//    MTE3_V event IDs in their constructors (a second set_flag before a wait is illegal).
// Numerics: lowering/ascend/kernel_model.py::w4a8.
#ifndef QNPU_W4A8_PER_TOKEN_KERNEL_HPP
#define QNPU_W4A8_PER_TOKEN_KERNEL_HPP

#include "catlass/arch/cross_core_sync.hpp"
#include "catlass/arch/resource.hpp"
#include "catlass/catlass.hpp"
#include "catlass/gemm_coord.hpp"
#include "catlass/matrix_coord.hpp"

namespace qnpu::kernel {
using namespace Catlass;

template <class BlockMmad_, class BlockEpilogue_, class BlockScheduler_>
class W4A8PerToken {
public:
    using BlockMmad = BlockMmad_;
    using BlockEpilogue = BlockEpilogue_;
    using BlockScheduler = BlockScheduler_;
    using ArchTag = typename BlockMmad::ArchTag;
    using L1TileShape = typename BlockMmad::L1TileShape;
    using ElementA = typename BlockMmad::ElementA;
    using LayoutA = typename BlockMmad::LayoutA;
    using ElementB = typename BlockMmad::ElementB;                      // int8, after the prologue
    using LayoutB = typename BlockMmad::LayoutB;
    using ElementPrologueB = typename BlockMmad::PrologueB::ElementSrc;  // int4
    using LayoutPrologueB = typename BlockMmad::PrologueB::LayoutSrc;
    using ElementC = typename BlockMmad::ElementC;                      // int32
    using EpilogueParams = typename BlockEpilogue::Params;
    static constexpr uint32_t WORKSPACE_STAGES = 2;
    // the block's B-prologue hand-off (flagCopyBFinish / flagPrologueBFinish per stage) takes the
    // cross-core flag IDs 0 .. 2 * STAGES - 1; this kernel's stage flags follow them
    static constexpr Arch::FlagID FLAG_BASE = 2 * BlockMmad::STAGES;
    static_assert(FLAG_BASE + 2 * WORKSPACE_STAGES <= Arch::AIV_INTER_BLOCK_BARRIER,
                  "IDs from 8 on are CATLASS's inter-block barriers");
    static_assert(std::is_same_v<ElementC, int32_t>, "the block matmul must leave int32 for the epilogue");

    struct Params {
        GemmCoord problemShape;
        uint32_t groupSize;                 // K of one block matmul: the group, or k per channel (> 0)
        GM_ADDR ptrA;
        LayoutA layoutA;
        GM_ADDR ptrPrologueB;
        LayoutPrologueB layoutPrologueB;
        GM_ADDR ptrScale;                   // float32 (k / groupSize, n): (1, n) per channel
        GM_ADDR ptrPerTokenScale;           // float32 (m,)
        GM_ADDR ptrD;                       // fp16 / bf16 (m, n)
        GM_ADDR ptrWorkspaceB;              // int8 weight tiles: STAGES x K1 x N1 per core
        GM_ADDR ptrWorkspaceC;              // int32 blocks: M1 x N1 per core and stage
    };

    static size_t WorkspaceB(uint32_t cores)
    {
        return static_cast<size_t>(BlockMmad::STAGES) * L1TileShape::K * L1TileShape::N * sizeof(ElementB) * cores;
    }
    static size_t WorkspaceC(uint32_t cores)
    {
        return static_cast<size_t>(L1TileShape::M) * L1TileShape::N * sizeof(ElementC) * cores * WORKSPACE_STAGES;
    }

    // Epilogue parameters are built on the device, as QuantMatmulMultiStageWorkspace does.
    CATLASS_DEVICE
    static EpilogueParams MakeEpilogueParams(Params const& p)
    {
        EpilogueParams e;
        e.ptrScale = reinterpret_cast<__gm__ float*>(p.ptrScale);
        e.ptrPerTokenScale = reinterpret_cast<__gm__ float*>(p.ptrPerTokenScale);
        e.ptrD = reinterpret_cast<__gm__ typename BlockEpilogue::ElementD*>(p.ptrD);
        e.n = p.problemShape.n();
        return e;
    }

    CATLASS_DEVICE
    W4A8PerToken()
    {
        for (uint32_t s = 0; s < WORKSPACE_STAGES; ++s) {
            aicStored[s] = Arch::CrossCoreFlag(FLAG_BASE + 2 * s);
            aivDone[s] = Arch::CrossCoreFlag(FLAG_BASE + 2 * s + 1);
        }
    }

    template <int32_t CORE_TYPE = g_coreType>
    CATLASS_DEVICE void operator()(Params const& params);

    // AIC: block matmuls; each int32 result goes to a workspace stage the AIV epilogue drains.
    template <>
    CATLASS_DEVICE void operator()<AscendC::AIC>(Params const& params)
    {
        const uint32_t core = AscendC::GetBlockIdx();
        const uint32_t cores = AscendC::GetBlockNum();
        BlockMmad blockMmad(resource);
        BlockScheduler scheduler(params.problemShape, L1TileShape::ToCoordMN());
        AscendC::GlobalTensor<ElementA> gmA;
        gmA.SetGlobalBuffer(reinterpret_cast<__gm__ ElementA*>(params.ptrA));
        LayoutB layoutBlockB{L1TileShape::K, L1TileShape::N};
        AscendC::GlobalTensor<ElementB> gmBlockB;
        gmBlockB.SetGlobalBuffer(reinterpret_cast<__gm__ ElementB*>(params.ptrWorkspaceB) +
                                 core * layoutBlockB.Capacity() * BlockMmad::STAGES);
        AscendC::GlobalTensor<ElementC> gmC;
        gmC.SetGlobalBuffer(reinterpret_cast<__gm__ ElementC*>(params.ptrWorkspaceC));
        layout::RowMajor layoutC{L1TileShape::M * cores * WORKSPACE_STAGES, L1TileShape::N};

        uint32_t stage = 0, used = 0;
        const uint32_t kSteps = params.problemShape.k() / params.groupSize;
        for (uint32_t loop = core; loop < scheduler.GetCoreLoops(); loop += cores) {
            GemmCoord blockCoord = scheduler.GetBlockCoord(loop);
            GemmCoord shape = scheduler.GetActualBlockShape(blockCoord);
            for (uint32_t g = 0; g < kSteps; ++g) {
                if (used == WORKSPACE_STAGES) {
                    Arch::CrossCoreWaitFlag(aivDone[stage]);    // the epilogue has drained this stage
                } else {
                    ++used;
                }
                GemmCoord stepShape{shape.m(), shape.n(), params.groupSize};
                MatrixCoord offsetA{blockCoord.m() * L1TileShape::M, g * params.groupSize};
                MatrixCoord offsetC{(stage * cores + core) * L1TileShape::M, 0};
                blockMmad(gmA[params.layoutA.GetOffset(offsetA)],
                          params.layoutA.GetTileLayout(stepShape.GetCoordMK()), gmBlockB, layoutBlockB,
                          gmC[layoutC.GetOffset(offsetC)], layoutC.GetTileLayout(stepShape.GetCoordMN()), stepShape);
                Arch::CrossCoreSetFlag<0x2, PIPE_FIX>(aicStored[stage]);
                stage = (stage + 1 < WORKSPACE_STAGES) ? stage + 1 : 0;
            }
        }
        while (used > 0) {                                     // wait for the epilogue to finish
            uint32_t s = (stage >= used) ? stage - used : stage + WORKSPACE_STAGES - used;
            Arch::CrossCoreWaitFlag(aivDone[s]);
            --used;
        }
        AscendC::PipeBarrier<PIPE_ALL>();
    }

    // AIV: the steps (block, K group) of this core in order; the int4 -> int8 prologue of step t + 1
    // runs before the epilogue of step t waits for its matmul, so the cube finds step t + 1's weights
    // ready while the vector units drain step t. Deadlock-free: the prologue of t + 1 waits only for
    // the cube's copy of step t - 1's tile out of the same workspace stage, and the cube never waits
    // for an epilogue later than t - 1 before finishing step t + 1.
    template <>
    CATLASS_DEVICE void operator()<AscendC::AIV>(Params const& params)
    {
        const uint32_t core = AscendC::GetBlockIdx() / AscendC::GetSubBlockNum();
        const uint32_t cores = AscendC::GetBlockNum();
        BlockMmad blockMmad(resource);
        BlockEpilogue blockEpilogue(resource, MakeEpilogueParams(params));
        BlockScheduler scheduler(params.problemShape, L1TileShape::ToCoordMN());
        AscendC::GlobalTensor<ElementPrologueB> gmPrologueB;
        gmPrologueB.SetGlobalBuffer(reinterpret_cast<__gm__ ElementPrologueB*>(params.ptrPrologueB));
        LayoutB layoutBlockB{L1TileShape::K, L1TileShape::N};
        AscendC::GlobalTensor<ElementB> gmBlockB;
        gmBlockB.SetGlobalBuffer(reinterpret_cast<__gm__ ElementB*>(params.ptrWorkspaceB) +
                                 core * layoutBlockB.Capacity() * BlockMmad::STAGES);
        AscendC::GlobalTensor<ElementC> gmC;
        gmC.SetGlobalBuffer(reinterpret_cast<__gm__ ElementC*>(params.ptrWorkspaceC));
        layout::RowMajor layoutC{L1TileShape::M * cores * WORKSPACE_STAGES, L1TileShape::N};

        const uint32_t kSteps = params.problemShape.k() / params.groupSize;
        const uint32_t coreLoops = scheduler.GetCoreLoops();
        const uint32_t blocksHere = (coreLoops > core) ? (coreLoops - core + cores - 1) / cores : 0;
        const uint32_t steps = blocksHere * kSteps;
        auto prologue = [&](uint32_t t) {
            GemmCoord blockCoord = scheduler.GetBlockCoord(core + (t / kSteps) * cores);
            GemmCoord shape = scheduler.GetActualBlockShape(blockCoord);
            GemmCoord stepShape{shape.m(), shape.n(), params.groupSize};
            MatrixCoord offsetB{(t % kSteps) * params.groupSize, blockCoord.n() * L1TileShape::N};
            blockMmad.Prologue(gmPrologueB[params.layoutPrologueB.GetOffset(offsetB)],
                               params.layoutPrologueB.GetTileLayout(stepShape.GetCoordKN()), gmBlockB, layoutBlockB,
                               stepShape);
        };
        if (steps > 0) {
            prologue(0);
        }
        uint32_t stage = 0;
        for (uint32_t t = 0; t < steps; ++t) {
            if (t + 1 < steps) {
                prologue(t + 1);
            }
            GemmCoord blockCoord = scheduler.GetBlockCoord(core + (t / kSteps) * cores);
            GemmCoord shape = scheduler.GetActualBlockShape(blockCoord);
            GemmCoord stepShape{shape.m(), shape.n(), params.groupSize};
            MatrixCoord offsetC{(stage * cores + core) * L1TileShape::M, 0};
            Arch::CrossCoreWaitFlag(aicStored[stage]);
            blockEpilogue(L1TileShape::ToCoord(), blockCoord, stepShape, t % kSteps, kSteps,
                          gmC[layoutC.GetOffset(offsetC)], layoutC.GetTileLayout(stepShape.GetCoordMN()));
            Arch::CrossCoreSetFlag<0x2, PIPE_MTE3>(aivDone[stage]);
            stage = (stage + 1 < WORKSPACE_STAGES) ? stage + 1 : 0;
        }
        AscendC::PipeBarrier<PIPE_ALL>();
    }

private:
    Arch::CrossCoreFlag aicStored[WORKSPACE_STAGES];
    Arch::CrossCoreFlag aivDone[WORKSPACE_STAGES];
    Arch::Resource<ArchTag> resource;
};

}  // namespace qnpu::kernel

#endif  // QNPU_W4A8_PER_TOKEN_KERNEL_HPP
