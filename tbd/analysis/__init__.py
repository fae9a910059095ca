"""Harmony analysis: do a detector's scores agree with its localisation quality?"""

from .harmony import (
    HarmonyStats,
    analyze_harmony,
    build_analysis_loader,
    collect_score_iou,
    harmony_maps,
    summarize,
)

__all__ = [
    "HarmonyStats",
    "analyze_harmony",
    "build_analysis_loader",
    "collect_score_iou",
    "harmony_maps",
    "summarize",
]
