"""A predicted region as one product: VRT mosaics and a STAC collection of its scenes.

``finalize(output_dir)`` runs when every share of a region is predicted (process 0 after
the others, or ``python -m lcseg.predict --finalize OUTPUT_DIR`` after a job array). It
reads the complete GeoTIFF class maps in the folder (those carrying lcseg's provenance
tags) and writes, beside them:

* ``mosaic_classes.vrt``: a GDAL virtual mosaic of the class maps (colour table, class
  names, nodata; where scenes overlap, the later one in name order wins, except where it
  has no data), and ``mosaic_probabilities.vrt`` when probabilities were written (one
  band per class; the scenes' masks make the mosaic's mask). The VRT XML is written here
  (rasterio has no gdalbuildvrt); any GDAL reader opens it, QGIS included. Scenes in
  several CRSs get one mosaic per CRS (``mosaic_classes_EPSG-32633.vrt``...): a VRT has
  one CRS, and reprojecting class maps is the user's choice to make.
* ``stac/collection.json`` and ``stac/items/<stem>.json`` (pystac): one Item per scene
  with its footprint and bbox in EPSG:4326, the projection extension (the scene's CRS,
  transform, shape), assets with roles and media types (classes, colour PNG,
  probabilities, polygons), the classification extension on the classes asset (value,
  name, colour of each class, and the nodata value), and the provenance
  (``lcseg:<key>``) in its properties; the collection's assets are the mosaics.

Everything is written under temporary names and renamed when complete; running it again
replaces the previous product.
"""

from __future__ import annotations

import datetime
import math
import os
import shutil
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import pystac
import rasterio
import rasterio.warp
from absl import logging
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.projection import ProjectionExtension

from lcseg.data import get_metadata
from lcseg.data.metadata import DatasetMetadata
from lcseg.predict.outputs import read_provenance
from lcseg.provenance import KEY_PREFIX

CLASSES_SUFFIX = "_classes.tif"
MOSAIC_PREFIX = "mosaic_"
STAC_DIR = "stac"
# GDAL names its data types as rasterio does, capitalised.
_VRT_TYPES = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "float32": "Float32"}
# Points per footprint edge: a straight edge in the scene's CRS is curved in EPSG:4326.
FOOTPRINT_POINTS = 21
MEDIA_TYPES = {".png": pystac.MediaType.PNG, ".gpkg": pystac.MediaType.GEOPACKAGE,
               ".geojson": pystac.MediaType.GEOJSON}


@dataclass
class SceneOutputs:
    """One complete scene of the region: its files and what its classes file says."""

    stem: str
    classes: Path
    provenance: dict[str, str]
    crs: rasterio.crs.CRS
    transform: rasterio.Affine
    width: int
    height: int
    cog: bool

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in the scene's CRS."""
        return rasterio.transform.array_bounds(self.height, self.width, self.transform)[:4]

    def sibling(self, suffix: str) -> Path:
        return self.classes.with_name(f"{self.stem}{suffix}")


def complete_scenes(output_dir: str | os.PathLike) -> list[SceneOutputs]:
    """The georeferenced scenes of ``output_dir`` whose classes file is complete (carries
    provenance tags), in name order. Plain-image outputs (PNG) have no place on a map."""
    scenes = []
    for path in sorted(Path(output_dir).glob(f"*{CLASSES_SUFFIX}")):
        record = read_provenance(path)
        if record is None:
            logging.warning("%s has no lcseg provenance tags (not a complete lcseg output): "
                            "left out of the mosaic and catalog.", path)
            continue
        with rasterio.open(path) as dataset:
            if dataset.crs is None:
                logging.warning("%s has no CRS: left out of the mosaic and catalog.", path)
                continue
            layout = dataset.tags(ns="IMAGE_STRUCTURE").get("LAYOUT", "")
            scenes.append(SceneOutputs(
                stem=path.name[:-len(CLASSES_SUFFIX)], classes=path, provenance=record,
                crs=dataset.crs, transform=dataset.transform, width=dataset.width,
                height=dataset.height, cog=layout.upper() == "COG"))
    return scenes


# ---------------------------------------------------------------------------------------
# VRT mosaics.
# ---------------------------------------------------------------------------------------


def _number(value: float) -> str:
    """A coordinate or offset for the VRT: integers as integers, else full precision."""
    return str(int(round(value))) if abs(value - round(value)) < 1e-6 else repr(float(value))


@dataclass
class _Grid:
    """The mosaic's pixel grid: the union of the scenes at the finest resolution."""

    left: float
    top: float
    xres: float
    yres: float
    width: int
    height: int

    @classmethod
    def of(cls, scenes: Sequence[SceneOutputs]) -> _Grid:
        xres = min(scene.transform.a for scene in scenes)
        yres = min(-scene.transform.e for scene in scenes)
        bounds = [scene.bounds for scene in scenes]
        left, bottom = min(b[0] for b in bounds), min(b[1] for b in bounds)
        right, top = max(b[2] for b in bounds), max(b[3] for b in bounds)
        # Tolerate rounding: a grid a millionth of a pixel wider is the same grid.
        width = math.ceil((right - left) / xres - 1e-6)
        height = math.ceil((top - bottom) / yres - 1e-6)
        return cls(left, top, xres, yres, width, height)

    def destination(self, scene: SceneOutputs) -> str:
        left, bottom, right, top = scene.bounds
        return (f'<DstRect xOff="{_number((left - self.left) / self.xres)}" '
                f'yOff="{_number((self.top - top) / self.yres)}" '
                f'xSize="{_number((right - left) / self.xres)}" '
                f'ySize="{_number((top - bottom) / self.yres)}"/>')

    def header(self, crs: rasterio.crs.CRS) -> list[str]:
        transform = (self.left, self.xres, 0.0, self.top, 0.0, -self.yres)
        return [f'<VRTDataset rasterXSize="{self.width}" rasterYSize="{self.height}">',
                # GIS order (x = easting / longitude first), as rasterio's transforms are.
                f'  <SRS dataAxisToSRSAxisMapping="1,2">{escape(crs.to_wkt())}</SRS>',
                f"  <GeoTransform>{', '.join(repr(float(v)) for v in transform)}"
                "</GeoTransform>"]


def _source(kind: str, path: Path, vrt_dir: Path, band: str, dataset, grid: _Grid,
            scene: SceneOutputs, extra: str = "", attributes: str = "") -> list[str]:
    """The XML of one scene's ``<SimpleSource>`` / ``<ComplexSource>`` in the mosaic."""
    block_x, block_y = dataset.block_shapes[0][::-1]
    dtype = _VRT_TYPES.get(dataset.dtypes[0], "Float32")
    return [f"    <{kind}{attributes}>",
            f'      <SourceFilename relativeToVRT="1">'
            f"{escape(os.path.relpath(path, vrt_dir))}</SourceFilename>",
            f"      <SourceBand>{band}</SourceBand>",
            f'      <SourceProperties RasterXSize="{dataset.width}" '
            f'RasterYSize="{dataset.height}" DataType="{dtype}" BlockXSize="{block_x}" '
            f'BlockYSize="{block_y}"/>',
            f'      <SrcRect xOff="0" yOff="0" xSize="{dataset.width}" '
            f'ySize="{dataset.height}"/>',
            f"      {grid.destination(scene)}",
            *([f"      {extra}"] if extra else []),
            f"    </{kind}>"]


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(text)
    os.replace(temporary, path)


def _classes_vrt(scenes: Sequence[SceneOutputs], metadata: DatasetMetadata,
                 path: Path) -> None:
    grid = _Grid.of(scenes)
    nodata = metadata.ignore_label
    with rasterio.open(scenes[0].classes) as first:
        colours = first.colormap(1)
    lines = [*grid.header(scenes[0].crs),
             '  <VRTRasterBand dataType="Byte" band="1">',
             f"    <NoDataValue>{nodata}</NoDataValue>",
             "    <ColorInterp>Palette</ColorInterp>",
             "    <CategoryNames>",
             *(f"      <Category>{escape(name)}</Category>" for name in metadata.class_names),
             "    </CategoryNames>",
             "    <ColorTable>",
             *(f'      <Entry c1="{c[0]}" c2="{c[1]}" c3="{c[2]}" c4="{c[3]}"/>'
               for _, c in sorted(colours.items())),
             "    </ColorTable>"]
    for scene in scenes:
        with rasterio.open(scene.classes) as dataset:
            # ComplexSource with NODATA: a scene's nodata pixels leave the scene under it
            # visible; nearest resampling keeps class indices whole.
            lines += _source("ComplexSource", scene.classes, path.parent, "1", dataset,
                             grid, scene, f"<NODATA>{nodata}</NODATA>",
                             ' resampling="nearest"')
    lines += ["  </VRTRasterBand>", "</VRTDataset>", ""]
    _write_atomically(path, "\n".join(lines))


def _probabilities_vrt(scenes: Sequence[SceneOutputs], metadata: DatasetMetadata,
                       path: Path) -> None:
    grid = _Grid.of(scenes)
    files = [scene.sibling("_probabilities.tif") for scene in scenes]
    with rasterio.open(files[0]) as first:
        count, dtype = first.count, _VRT_TYPES.get(first.dtypes[0], "Float32")
    lines = grid.header(scenes[0].crs)
    for band in range(1, count + 1):
        name = metadata.class_names[band - 1] if band <= metadata.num_classes else ""
        lines += [f'  <VRTRasterBand dataType="{dtype}" band="{band}">',
                  f"    <Description>{escape(name)}</Description>"]
        for scene, file in zip(scenes, files):
            with rasterio.open(file) as dataset:
                # The scene's own mask decides where it covers the scenes under it.
                lines += _source("ComplexSource", file, path.parent, str(band), dataset,
                                 grid, scene, "<UseMaskBand>true</UseMaskBand>")
        lines.append("  </VRTRasterBand>")
    # The mosaic's mask: valid where any scene is (a scene's 0s, with NODATA 0, leave
    # the scenes under it visible).
    lines += ["  <MaskBand>", '    <VRTRasterBand dataType="Byte">']
    for scene, file in zip(scenes, files):
        with rasterio.open(file) as dataset:
            lines += ["  " + line for line in _source("ComplexSource", file, path.parent,
                                                       "mask,1", dataset, grid, scene,
                                                       "<NODATA>0</NODATA>")]
    lines += ["    </VRTRasterBand>", "  </MaskBand>", "</VRTDataset>", ""]
    _write_atomically(path, "\n".join(lines))


def _crs_name(crs: rasterio.crs.CRS) -> str:
    authority = crs.to_authority()
    return f"{authority[0]}-{authority[1]}" if authority else f"crs{abs(hash(crs.to_wkt()))}"


def write_mosaics(scenes: Sequence[SceneOutputs], output_dir: Path,
                  metadata: DatasetMetadata) -> dict[str, Path]:
    """Writes the VRT mosaics of ``scenes`` (one per CRS); returns ``{name: path}``."""
    groups: dict[str, list[SceneOutputs]] = {}
    for scene in scenes:
        t = scene.transform
        if t.b or t.d or t.a <= 0 or t.e >= 0:
            logging.warning("%s is not north-up (transform %s): left out of the mosaic.",
                            scene.classes, tuple(t)[:6])
            continue
        groups.setdefault(scene.crs.to_wkt(), []).append(scene)
    written = {}
    for members in groups.values():
        tail = "" if len(groups) == 1 else f"_{_crs_name(members[0].crs)}"
        path = output_dir / f"{MOSAIC_PREFIX}classes{tail}.vrt"
        _classes_vrt(members, metadata, path)
        written[path.stem] = path
        with_probabilities = [s for s in members if s.sibling("_probabilities.tif").is_file()]
        if with_probabilities:
            path = output_dir / f"{MOSAIC_PREFIX}probabilities{tail}.vrt"
            _probabilities_vrt(with_probabilities, metadata, path)
            written[path.stem] = path
    return written


# ---------------------------------------------------------------------------------------
# STAC.
# ---------------------------------------------------------------------------------------


def _footprint(scene: SceneOutputs) -> dict:
    """The scene's outline in EPSG:4326 (edges densified, then transformed)."""
    left, bottom, right, top = scene.bounds
    steps = [i / (FOOTPRINT_POINTS - 1) for i in range(FOOTPRINT_POINTS)]
    ring = ([(left + (right - left) * s, top) for s in steps]
            + [(right, top - (top - bottom) * s) for s in steps[1:]]
            + [(right - (right - left) * s, bottom) for s in steps[1:]]
            + [(left, bottom + (top - bottom) * s) for s in steps[1:]])
    geometry = {"type": "Polygon", "coordinates": [ring]}
    return rasterio.warp.transform_geom(scene.crs, "EPSG:4326", geometry)


def _coordinates(geometry: dict) -> Iterable[tuple[float, float]]:
    if geometry["type"] == "Polygon":
        return (tuple(point) for ring in geometry["coordinates"] for point in ring)
    return (tuple(point) for polygon in geometry["coordinates"] for ring in polygon
            for point in ring)


def _created(scene: SceneOutputs) -> datetime.datetime:
    """When the scene's map was made: its provenance time if recorded, else the file's."""
    text = scene.provenance.get("time")
    if text:
        try:
            moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
            return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)
        except ValueError:
            pass
    return datetime.datetime.fromtimestamp(scene.classes.stat().st_mtime, datetime.UTC)


def _classifications(metadata: DatasetMetadata) -> list[Classification]:
    classes = [Classification.create(
        value=index, name=name, description=name,
        color_hint="{:02X}{:02X}{:02X}".format(*metadata.palette[index]))
        for index, name in enumerate(metadata.class_names)]
    classes.append(Classification.create(value=metadata.ignore_label, name="nodata",
                                         description="no data in the input", nodata=True))
    return classes


def scene_item(scene: SceneOutputs, metadata: DatasetMetadata) -> pystac.Item:
    """The STAC Item of one predicted scene (asset hrefs absolute; see ``write_catalog``)."""
    geometry = _footprint(scene)
    points = list(_coordinates(geometry))
    bbox = [min(p[0] for p in points), min(p[1] for p in points),
            max(p[0] for p in points), max(p[1] for p in points)]
    created = _created(scene)
    properties = {f"{KEY_PREFIX}{key}": value for key, value in scene.provenance.items()}
    properties["created"] = pystac.utils.datetime_to_str(created)
    item = pystac.Item(id=scene.stem, geometry=geometry, bbox=bbox, datetime=created,
                       properties=properties)
    projection = ProjectionExtension.ext(item, add_if_missing=True)
    authority = scene.crs.to_authority()
    projection.code = f"{authority[0]}:{authority[1]}" if authority else None
    projection.wkt2 = scene.crs.to_wkt()
    projection.transform = list(scene.transform)[:6]
    projection.shape = [scene.height, scene.width]
    projection.bbox = list(scene.bounds)

    geotiff = pystac.MediaType.COG if scene.cog else pystac.MediaType.GEOTIFF
    classes = pystac.Asset(str(scene.classes.resolve()), title="Class map",
                           description="Class index per pixel (uint8), colour table, "
                           f"nodata {metadata.ignore_label}.", media_type=geotiff,
                           roles=["data"])
    item.add_asset("classes", classes)
    ClassificationExtension.ext(classes, add_if_missing=True).classes = (
        _classifications(metadata))
    colour = scene.sibling("_colour.png")
    if colour.is_file():
        item.add_asset("colour", pystac.Asset(
            str(colour.resolve()), title="Class map in colours", media_type=
            pystac.MediaType.PNG, roles=["visual"]))
    probabilities = scene.sibling("_probabilities.tif")
    if probabilities.is_file():
        with rasterio.open(probabilities) as dataset:
            probability_cog = dataset.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        item.add_asset("probabilities", pystac.Asset(
            str(probabilities.resolve()), title="Class probabilities",
            description="One band per class, in class order: "
            f"{', '.join(metadata.class_names)}.",
            media_type=pystac.MediaType.COG if probability_cog else pystac.MediaType.GEOTIFF,
            roles=["data"]))
    for name in metadata.class_names:
        for suffix, media_type in MEDIA_TYPES.items():
            polygons = scene.sibling(f"_{name}{suffix}")
            if suffix != ".png" and polygons.is_file():
                item.add_asset(f"polygons_{name}", pystac.Asset(
                    str(polygons.resolve()), title=f"Regions of class {name}",
                    media_type=media_type, roles=["data"]))
    return item


def write_catalog(items: Sequence[pystac.Item], mosaics: dict[str, Path], output_dir: Path,
                  *, description: str) -> Path:
    """Writes ``stac/collection.json`` and ``stac/items/<id>.json`` (self-contained:
    relative links and asset hrefs, so the folder can move or be served as is).

    Returns:
      The collection's path.
    """
    final = output_dir / STAC_DIR
    temporary = output_dir / f".{STAC_DIR}.partial"
    shutil.rmtree(temporary, ignore_errors=True)
    boxes = [item.bbox for item in items]
    times = [item.datetime for item in items]
    extent = pystac.Extent(
        pystac.SpatialExtent([[min(b[0] for b in boxes), min(b[1] for b in boxes),
                               max(b[2] for b in boxes), max(b[3] for b in boxes)]]),
        pystac.TemporalExtent([[min(times), max(times)]]))
    collection = pystac.Collection(id=output_dir.resolve().name or "region",
                                   description=description, extent=extent, license="other")
    collection.set_self_href(str(temporary / "collection.json"))
    for name, path in mosaics.items():
        collection.add_asset(name, pystac.Asset(
            os.path.relpath(path, final), title=f"Mosaic ({name}), a GDAL VRT",
            media_type="application/xml", roles=["data"]))
    for item in items:
        collection.add_item(item)
        item.set_self_href(str(temporary / "items" / f"{item.id}.json"))
        item.make_asset_hrefs_relative()
    collection.save(pystac.CatalogType.SELF_CONTAINED)
    # Swap the folder in whole: readers never see half a catalog.
    previous = output_dir / f".{STAC_DIR}.previous"
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        os.replace(final, previous)
    os.replace(temporary, final)
    shutil.rmtree(previous, ignore_errors=True)
    return final / "collection.json"


def finalize(output_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes the region's mosaics and STAC collection from its complete scenes.

    Args:
      output_dir: the folder ``python -m lcseg.predict --output`` wrote into.

    Returns:
      ``{'mosaic_classes': path, ['mosaic_probabilities': path,] 'collection': path}``
      (mosaic names carry a CRS suffix when the scenes are in several CRSs); empty when
      the folder holds no georeferenced scene.

    Raises:
      FileNotFoundError: no such folder.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"--finalize {output_dir}: no such folder.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        scenes = complete_scenes(output_dir)
    if not scenes:
        logging.warning("%s holds no complete georeferenced class map: no mosaic or catalog.",
                        output_dir)
        return {}
    datasets = {scene.provenance.get("dataset") for scene in scenes}
    models = {(s.provenance.get("config_hash"), s.provenance.get("checkpoint_step"))
              for s in scenes}
    if len(datasets) != 1:
        raise ValueError(f"{output_dir} holds maps of several datasets' classes "
                         f"({sorted(map(str, datasets))}): one region, one class list; "
                         "predict them into separate folders.")
    if len(models) > 1:
        logging.warning("%s holds maps from %d different runs or checkpoints; each STAC Item "
                        "says which made it.", output_dir, len(models))
    metadata = get_metadata(datasets.pop())
    mosaics = write_mosaics(scenes, output_dir, metadata)
    items = [scene_item(scene, metadata) for scene in scenes]
    collection = write_catalog(
        items, mosaics, output_dir,
        description=f"Land-cover maps ({metadata.name} classes: "
        f"{', '.join(metadata.class_names)}) predicted by lcseg, {len(items)} scenes.")
    logging.info("Region of %d scenes: %s, %s", len(scenes),
                 ", ".join(str(p) for p in mosaics.values()), collection)
    return {**mosaics, "collection": collection}
