"""Metrics against small cases worked out by hand, and the exact AUPRO against a brute-force one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from defectclip import metrics
from defectclip.metrics import aupro, evaluate, f1_max, image_auroc, pixel_ap, pixel_auroc
from defectclip.results import AnomalyResult

# --------------------------------------------------------------------------- image level


def test_image_auroc_counts_correctly_ordered_pairs():
    # Anomalous 0.35 beats normal 0.1 but not 0.4; anomalous 0.8 beats both: 3 of 4 pairs.
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_image_auroc_counts_a_tie_as_half_a_pair():
    # Pairs (anomalous, normal): (0.5, 0.2)=1, (0.5, 0.5)=0.5 tie, (0.9, 0.2)=1, (0.9, 0.5)=1.
    assert image_auroc([0, 0, 1, 1], [0.2, 0.5, 0.5, 0.9]) == pytest.approx(3.5 / 4)


def test_image_auroc_is_one_for_perfect_separation_and_zero_when_inverted():
    labels = [0, 1, 0, 1, 1]
    scores = [0.1, 0.7, 0.2, 0.9, 0.8]
    assert image_auroc(labels, scores) == 1.0
    assert image_auroc(labels, [-s for s in scores]) == 0.0


def test_image_auroc_accepts_torch_tensors_and_bool_labels():
    labels = torch.tensor([False, False, True, True])
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8], dtype=torch.bfloat16, requires_grad=True)
    assert image_auroc(labels, scores) == pytest.approx(0.75)
    assert image_auroc([0, 0, 1, 1], [torch.tensor(0.1), torch.tensor(0.4), torch.tensor(0.35), torch.tensor(0.8)]) == (
        pytest.approx(0.75)
    )


def test_f1_max_finds_the_best_threshold_by_hand():
    labels = [0, 1, 0, 1, 1]
    scores = [0.1, 0.3, 0.4, 0.6, 0.8]
    # score >= t is anomalous:        TP FP FN   F1
    #   t=0.8                          1  0  2   0.5
    #   t=0.6                          2  0  1   0.8
    #   t=0.4                          2  1  1   2/3
    #   t=0.3                          3  1  0   6/7   <- best
    #   t=0.1                          3  2  0   0.75
    best, threshold = f1_max(labels, scores)
    assert best == pytest.approx(6 / 7)
    assert threshold == 0.3
    # The returned threshold reproduces the F1 under the documented ">=" rule.
    assert f1_score(labels, np.asarray(scores) >= threshold) == pytest.approx(best)


def test_f1_max_is_one_for_perfect_separation_at_the_lowest_anomalous_score():
    assert f1_max([0, 0, 1, 1], [0.1, 0.2, 0.6, 0.9]) == (1.0, 0.6)


# --------------------------------------------------------------------------- pixel AUROC / AP


def _two_images_of_different_sizes():
    masks = [np.array([[0, 1]], dtype=bool), np.array([[0, 0], [1, 0]], dtype=bool)]
    maps = [np.array([[0.2, 0.6]]), np.array([[0.6, 0.1], [0.3, 0.7]])]
    return masks, maps


def test_pixel_auroc_pools_pixels_of_images_with_different_sizes():
    masks, maps = _two_images_of_different_sizes()
    # Anomalous 0.6 vs normals 0.2, 0.6, 0.1, 0.7: 1 + 0.5 + 1 + 0 = 2.5
    # Anomalous 0.3 vs normals 0.2, 0.6, 0.1, 0.7: 1 + 0 + 1 + 0 = 2
    assert pixel_auroc(masks, maps) == pytest.approx(4.5 / 8)


def test_pixel_ap_by_hand():
    masks, maps = _two_images_of_different_sizes()
    # Descending: 0.7 N | 0.6 P, 0.6 N | 0.3 P | ...  -> recall steps of 0.5 at precision 1/3 then 2/4.
    assert pixel_ap(masks, maps) == pytest.approx(0.5 * (1 / 3) + 0.5 * (2 / 4))


def test_pixel_metrics_accept_a_stacked_torch_tensor():
    masks = torch.zeros(2, 3, 3, dtype=torch.bool)
    masks[1, 1, 1] = True
    maps = masks.float() * 0.9 + 0.05
    assert pixel_auroc(masks, maps) == 1.0
    assert pixel_ap(masks, maps) == 1.0


@pytest.mark.parametrize("quantise", [None, 10, 3])
def test_pixel_auroc_and_ap_equal_scikit_learn_on_pooled_pixels(quantise, monkeypatch):
    # A tiny chunk size makes the normal pixels stream through several sorted chunks.
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", 50)
    masks, maps = _random_case(np.random.default_rng(7), quantise)
    truth = np.concatenate([m.ravel() for m in masks])
    scores = np.concatenate([a.ravel() for a in maps])
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    assert pixel_ap(masks, maps) == pytest.approx(average_precision_score(truth, scores), abs=1e-12)


# --------------------------------------------------------------------------- AUPRO


def _square_defect_image():
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:5, 3:6] = True
    return mask


def test_aupro_is_one_for_a_perfect_map():
    mask = _square_defect_image()
    assert aupro([mask], [mask.astype(np.float32)]) == pytest.approx(1.0)


def test_aupro_is_zero_for_an_inverted_map():
    mask = _square_defect_image()
    assert aupro([mask], [1.0 - mask.astype(np.float32)]) == pytest.approx(0.0)


def _two_region_image(region_a_scores, region_b_scores, normal_scores):
    """4 x 4 image: region A = top-left 2 x 2 block, region B = two pixels at the bottom right
    (not touching A even diagonally), the other 10 pixels normal."""
    mask = np.zeros((4, 4), dtype=bool)
    mask[0:2, 0:2] = True
    mask[3, 2:4] = True
    anomaly_map = np.zeros((4, 4))
    anomaly_map[0:2, 0:2] = np.reshape(region_a_scores, (2, 2))
    anomaly_map[3, 2:4] = region_b_scores
    anomaly_map[~mask] = normal_scores
    return mask, anomaly_map


NORMAL_SCORES = [0.95, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05]


def test_aupro_averages_over_regions_not_pixels():
    # Region A (4 px) scores above every normal pixel, region B (2 px) below every one: for
    # FPR in (0, 1) one region of two is found, PRO = 0.5 (pixel-wise it would be 4/6).
    mask, anomaly_map = _two_region_image([1.0] * 4, [0.0, 0.0], [s * 0.9 + 0.05 for s in NORMAL_SCORES])
    assert aupro([mask], [anomaly_map]) == pytest.approx(0.5)


def test_aupro_partial_region_by_hand():
    mask, anomaly_map = _two_region_image([0.9, 0.9, 0.6, 0.6], [0.0, 0.0], NORMAL_SCORES)
    # Curve (FPR, PRO) walking the threshold down over 10 normal pixels and regions A, B:
    #   t=0.95 (0.1, 0)   t=0.9 (0.1, 0.25)   t=0.8 (0.2, 0.25)   t=0.7 (0.3, 0.25)
    #   t=0.6  (0.4, 0.5)  -- a normal pixel ties with half of A: a diagonal edge
    # Area to 0.3 = 0.25 * 0.2 = 0.05.
    assert aupro([mask], [anomaly_map], max_fpr=0.3) == pytest.approx(0.05 / 0.3)
    # At 0.35 the diagonal edge is cut: PRO = 0.375; extra trapezoid 0.05 * (0.25 + 0.375) / 2.
    assert aupro([mask], [anomaly_map], max_fpr=0.35) == pytest.approx((0.05 + 0.015625) / 0.35)


def test_aupro_joins_diagonal_neighbours_into_one_region():
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[1, 2] = True  # (0,0) touches (1,1) only at a corner
    anomaly_map = np.full((4, 4), 0.5)
    anomaly_map[mask] = 0.0
    anomaly_map[0, 0] = 1.0
    # 8-connectivity: one 3-pixel region, a third of it found -> 1/3 (two regions would give 0.5).
    assert aupro([mask], [anomaly_map]) == pytest.approx(1 / 3)


def test_aupro_pools_regions_and_normal_pixels_over_images():
    found, missed, defect_free = np.zeros((4, 4), bool), np.zeros((4, 4), bool), np.zeros((5, 5), bool)
    found[1:3, 1:3] = True
    missed[0, 0] = True
    maps = [np.where(found, 0.9, 0.5), np.where(missed, 0.1, 0.5), torch.full((5, 5), 0.2)]
    # Image 1's region is found before any normal pixel, image 2's after all of them: PRO 0.5.
    assert aupro([found, missed, defect_free], maps) == pytest.approx(0.5)


def test_aupro_grid_matches_exact_on_a_perfect_map_and_approximates_otherwise():
    rng = np.random.default_rng(0)
    masks, maps = _random_case(rng, quantise=None)
    mask = _square_defect_image()
    assert aupro([mask], [mask.astype(float)], num_thresholds=10) == pytest.approx(1.0)
    exact = aupro(masks, maps)
    assert aupro(masks, maps, num_thresholds=5000) == pytest.approx(exact, abs=0.01)


def _random_case(rng, quantise):
    """Three images with blob-shaped defects and scores correlated with them; quantising the
    scores creates many ties between normal and anomalous pixels."""
    masks, maps = [], []
    for shape in [(12, 16), (9, 9), (20, 7)]:
        mask = rng.random(shape) < 0.15
        anomaly_map = rng.random(shape) + 0.6 * mask
        if quantise:
            anomaly_map = np.round(anomaly_map * quantise) / quantise
        masks.append(mask)
        maps.append(anomaly_map)
    return masks, maps


def _brute_force_aupro(masks, maps, max_fpr):
    """Reference: evaluate every distinct score as a threshold, one at a time."""
    from scipy import ndimage

    regions = []
    for index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(index, labelled == r) for r in range(1, count + 1)]
    normal_total = sum((~m).sum() for m in masks)
    points = [(0.0, 0.0)]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        false_positives = sum(((a >= t) & ~m).sum() for m, a in zip(masks, maps))
        overlaps = [(maps[i][region] >= t).mean() for i, region in regions]
        points.append((false_positives / normal_total, float(np.mean(overlaps))))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= max_fpr:
            break
        end = min(x1, max_fpr)
        y_end = y1 if x1 == x0 else y0 + (y1 - y0) * (end - x0) / (x1 - x0)
        area += (end - x0) * (y0 + y_end) / 2
    return area / max_fpr


@pytest.mark.parametrize("quantise", [None, 10, 4])
@pytest.mark.parametrize("max_fpr", [0.05, 0.3, 1.0])
def test_aupro_exact_matches_brute_force(quantise, max_fpr, monkeypatch):
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", 64)
    masks, maps = _random_case(np.random.default_rng(quantise or 1), quantise)
    assert aupro(masks, maps, max_fpr=max_fpr) == pytest.approx(_brute_force_aupro(masks, maps, max_fpr))


def test_aupro_accepts_half_precision_tensors():
    mask = torch.from_numpy(_square_defect_image())
    assert aupro([mask], [mask.half()]) == pytest.approx(1.0)


# --------------------------------------------------------------------------- evaluate


def test_evaluate_with_results_and_masks_reports_every_metric():
    masks, maps = _two_images_of_different_sizes()
    masks.append(np.zeros((3, 3), dtype=bool))
    maps.append(np.full((3, 3), 0.05))
    results = [AnomalyResult.from_map(m, score=float(np.max(m)), threshold=0.5) for m in maps]
    metrics = evaluate(results, masks)  # labels come from the masks: [1, 1, 0]
    assert set(metrics) == {"image_auroc", "f1_max", "f1_threshold", "pixel_auroc", "pixel_ap", "aupro"}
    assert metrics["image_auroc"] == 1.0  # image scores 0.6, 0.7 vs 0.05
    assert metrics["f1_max"] == 1.0
    assert metrics["f1_threshold"] == pytest.approx(0.6)
    assert metrics["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps))
    assert metrics["pixel_ap"] == pytest.approx(pixel_ap(masks, maps))
    assert metrics["aupro"] == pytest.approx(aupro(masks, maps))


def test_evaluate_without_masks_skips_pixel_metrics_and_scores_maps_by_their_maximum():
    maps = [np.array([[0.1, 0.2]]), np.array([[0.1, 0.9]]), np.array([[0.3, 0.4]])]
    metrics = evaluate(maps, labels=[0, 1, 0])
    assert set(metrics) == {"image_auroc", "f1_max", "f1_threshold"}
    assert metrics["image_auroc"] == 1.0
    assert metrics["f1_threshold"] == pytest.approx(0.9)


# --------------------------------------------------------------------------- errors


def test_length_mismatch_is_reported_with_both_lengths():
    with pytest.raises(ValueError, match="4 labels vs 3 scores"):
        image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="2 masks vs 1 maps"):
        pixel_auroc([np.zeros((2, 2))] * 2, [np.zeros((2, 2))])
    with pytest.raises(ValueError, match="1 masks vs 2 results"):
        evaluate([np.zeros((2, 2))] * 2, masks=[np.ones((2, 2))])


def test_shape_mismatch_names_the_image():
    masks = [np.zeros((4, 4), bool), np.ones((4, 4), bool)]
    maps = [np.zeros((4, 4)), np.zeros((8, 8))]
    for metric in (pixel_auroc, pixel_ap, aupro):
        with pytest.raises(ValueError, match=r"map 1 has shape \(8, 8\) but mask 1 has shape \(4, 4\)"):
            metric(masks, maps)


def test_one_class_says_auroc_is_undefined():
    with pytest.raises(ValueError, match="image AUROC is undefined: only one class.*every image is normal"):
        image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="pixel AUROC is undefined: only one class.*every pixel is normal"):
        pixel_auroc([np.zeros((2, 2), bool)], [np.zeros((2, 2))])
    with pytest.raises(ValueError, match="AUPRO is undefined: no mask has an anomalous pixel"):
        aupro([np.zeros((2, 2), bool)], [np.zeros((2, 2))])
    with pytest.raises(ValueError, match="AUPRO is undefined: every pixel is anomalous"):
        aupro([np.ones((2, 2), bool)], [np.zeros((2, 2))])


def test_nan_scores_are_rejected():
    with pytest.raises(ValueError, match=r"scores contains NaN \(first positions: \[\[1\]\]\)"):
        image_auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="map 1 contains NaN"):
        aupro([np.ones((1, 2), bool), np.array([[1, 0]], bool)], [np.zeros((1, 2)), np.array([[0.5, np.nan]])])


def test_other_bad_inputs_are_rejected_clearly():
    with pytest.raises(ValueError, match=r"labels must be 0/1 or bool.*\[0, 1, 2\]"):
        image_auroc([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="map 0 must be 2-D"):
        pixel_auroc([np.zeros((1, 2, 2), bool)], [np.zeros((1, 2, 2))])
    with pytest.raises(ValueError, match="max_fpr must be in"):
        aupro([_square_defect_image()], [np.zeros((8, 8))], max_fpr=0)
    with pytest.raises(ValueError, match="needs labels or masks"):
        evaluate([np.zeros((2, 2))])


def test_per_defect_type_metrics_show_the_type_the_model_misses():
    """Two defect types: 'dent' lit up where the mask is, 'stain' scored like normal surface."""
    rng = np.random.default_rng(0)
    maps, masks, kinds = [], [], []
    for _ in range(3):
        maps.append(rng.uniform(0, 1, (16, 16)))
        masks.append(np.zeros((16, 16), bool))
        kinds.append("good")
    for kind, lift in (("dent", 5.0), ("stain", 0.0)):
        for _ in range(2):
            mask = np.zeros((16, 16), bool)
            mask[4:10, 4:10] = True
            anomaly_map = rng.uniform(0, 1, (16, 16))
            anomaly_map[mask] += lift
            maps.append(anomaly_map)
            masks.append(mask)
            kinds.append(kind)
    by_type = metrics.evaluate_by_defect_type(maps, masks, kinds)
    assert set(by_type) == {"dent", "stain"}
    assert by_type["dent"]["images"] == 2 and by_type["dent"]["pixel_auroc"] == 1.0 and by_type["dent"]["image_auroc"] == 1.0
    assert by_type["stain"]["pixel_auroc"] < 0.75
    # each type is judged on its own images plus the normal ones only
    dent_only = [i for i, k in enumerate(kinds) if k != "stain"]
    assert by_type["dent"]["aupro"] == evaluate([maps[i] for i in dent_only], [masks[i] for i in dent_only])["aupro"]
    with pytest.raises(ValueError, match="needs normal images"):
        metrics.evaluate_by_defect_type(maps[3:], masks[3:], kinds[3:])
