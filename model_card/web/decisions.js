// The decision rules that need only the graph's outputs and the candidate table of config.json, ranked as the Python
// package's `decisions.rank_places` ranks them, with the fields of `answers.format_answers` and the confidence of
// `decisions._confidence`. Ties go to the row listed first.

export const DECISIONS = ["joint", "greedy", "expected_distance", "within_km"];
// geodesy.EARTH_RADIUS_KM: the sphere of the geodesic_accuracy metric.
export const EARTH_RADIUS_KM = 6371.0088;
// answers.CONFIDENCE_RADII_KM: the keys of each answer's `within_km`.
const CONFIDENCE_RADII_KM = [1, 25, 200, 750, 2500];
// The Space's CONFIDENT_RADIUS_KM: beyond the metric's continent level an answer says little more than "on Earth".
const CONFIDENT_RADIUS_KM = 2500;

// The candidate table of config.json, with each city's region (or country, without a region level) as its parent.
export class CandidateTable {
  constructor(config) {
    const places = config.candidate_places;
    if (!places || !Array.isArray(places.city_names)) {
      throw new Error("config.json has no candidate_places: export a model saved with its candidate table.");
    }
    Object.assign(this, places);
    this.hasRegions = Array.isArray(places.region_names);
    this.numCities = places.city_names.length;
    this.labels = this.city_names.map((_, row) => config.id2label?.[row] ?? this.#label(row));
    // config.expected_distance_candidates: the most probable cities among which the expected distance is weighed.
    this.expectedDistanceCandidates = config.expected_distance_candidates ?? 50;
    // The other decision settings of StreetCLIPConfig, with its defaults (config.json leaves defaults out).
    this.decisionRadiusKm = config.decision_radius_km ?? 25;
    this.confidenceLevel = config.confidence_level ?? 0.9;
    this.calibration = config.calibration?.temperatures ? config.calibration : null;
    this.unitVectors = this.city_latitudes.map((latitude, row) => unitVector(latitude, this.city_longitudes[row]));
  }

  #label(row) {
    const parts = [this.city_names[row]];
    if (this.hasRegions) parts.push(this.region_names[this.city_regions[row]]);
    parts.push(this.country_names[this.city_countries[row]]);
    return parts.join(", ");
  }
}

// Log-softmax of `logits` within groups: `groups[i]` is the group of entry i.
function logSoftmaxWithin(logits, groups, numGroups) {
  const peak = new Float64Array(numGroups).fill(-Infinity);
  logits.forEach((value, i) => (peak[groups[i]] = Math.max(peak[groups[i]], value)));
  const mass = new Float64Array(numGroups);
  logits.forEach((value, i) => (mass[groups[i]] += Math.exp(value - peak[groups[i]])));
  return Array.from(logits, (value, i) => value - peak[groups[i]] - Math.log(mass[groups[i]]));
}

// Each city's log p(country), log p(region | country) (0 without a region level) and log p(city | parent), from one
// image's outputs.
function levels(table, outputs) {
  const countries = new Array(table.country_names.length).fill(0);
  const country = logSoftmaxWithin(outputs.country_logits, countries, 1);
  let region = new Array(table.numCities).fill(0);
  let city;
  if (table.hasRegions) {
    const regionLevel = logSoftmaxWithin(outputs.region_logits, table.region_countries, table.country_names.length);
    region = table.city_regions.map((row) => regionLevel[row]);
    city = logSoftmaxWithin(outputs.city_logits, table.city_regions, table.region_names.length);
  } else {
    city = logSoftmaxWithin(outputs.city_logits, table.city_countries, table.country_names.length);
  }
  return { country: table.city_countries.map((row) => country[row]), region, city };
}

// The joint probability of every city: softmax of the graph's `logits` (log joint probabilities).
function jointProbabilities(logits) {
  const peak = Math.max(...logits);
  const mass = logits.reduce((sum, value) => sum + Math.exp(value - peak), 0);
  return Array.from(logits, (value) => Math.exp(value - peak) / mass);
}

// The probability of each city that `within_km` sums, as `decisions.confidence_posterior`: the joint posterior, with
// each level's logits divided by its temperature in config.calibration when one is stored.
function confidencePosterior(table, outputs) {
  const temperatures = table.calibration?.temperatures;
  const scaled = (name, level) =>
    outputs[name] && temperatures ? outputs[name].map((value) => value / temperatures[level]) : outputs[name];
  const level = levels(table, {
    country_logits: scaled("country_logits", "country"),
    region_logits: scaled("region_logits", "region"),
    city_logits: scaled("city_logits", "city"),
  });
  return level.country.map((country, row) => Math.exp(country + level.region[row] + level.city[row]));
}

function unitVector(latitude, longitude) {
  const [phi, lambda] = [(latitude * Math.PI) / 180, (longitude * Math.PI) / 180];
  return [Math.cos(phi) * Math.cos(lambda), Math.cos(phi) * Math.sin(lambda), Math.sin(phi)];
}

// The posterior mass of the cities within each radius of city `row`, as `decisions.within_km`: d <= r where the cosine
// of the central angle is at least cos(r / R).
function massWithin(table, row, posterior, radii) {
  const [x, y, z] = table.unitVectors[row];
  const cosines = table.unitVectors.map(([u, v, w]) => x * u + y * v + z * w);
  return radii.map((radius) => {
    const bound = Math.cos(radius / EARTH_RADIUS_KM);
    const mass = cosines.reduce((sum, cosine, other) => (cosine >= bound ? sum + posterior[other] : sum), 0);
    return Math.min(Math.max(mass, 0), 1);
  });
}

// numpy.interp: linear between knots, the end values beyond them.
function interpolate(value, { x, y }) {
  if (value < x[0]) return y[0];
  const j = x.findLastIndex((knot) => knot <= value);
  if (j === x.length - 1 || x[j] === value) return y[j];
  return ((y[j + 1] - y[j]) / (x[j + 1] - x[j])) * (value - x[j]) + y[j];
}

// `within_km`, `radius_km` and `calibrated` of an answer at city `row`, as `decisions._confidence`: each radius' mass
// through the calibration's monotone map if it has one, kept non-decreasing with the radius by a running maximum.
function confidence(table, row, posterior) {
  const maps = table.calibration?.within_km;
  let within = massWithin(table, row, posterior, CONFIDENCE_RADII_KM);
  if (maps) {
    let peak = -Infinity;
    within = within.map((mass, i) => {
      const knots = maps[CONFIDENCE_RADII_KM[i]];
      return (peak = Math.max(peak, knots ? interpolate(mass, knots) : mass));
    });
  }
  const reached = within.findIndex((mass) => mass >= table.confidenceLevel);
  return {
    within_km: Object.fromEntries(CONFIDENCE_RADII_KM.map((radius, i) => [String(radius), within[i]])),
    radius_km: reached < 0 ? null : CONFIDENCE_RADII_KM[reached],
    calibrated: table.calibration !== null,
  };
}

// The radius of the smallest circle around an answer that holds `config.confidence_level` of the posterior (the
// farthest city's distance where none does), and the words the Space says it in, as the Space's `PhotoResult`.
// Calibrated maps hold at the five radii only: then the answer's own `radius_km` is said.
export function confidenceRegion(table, outputs, answer) {
  const { latitude, longitude } = answer;
  const distances = table.city_latitudes.map((other, row) => haversineKm(latitude, longitude, other, table.city_longitudes[row]));
  const radiusKm = table.calibration?.within_km
    ? (answer.radius_km ?? Math.max(...distances))
    : posteriorRadius(table, confidencePosterior(table, outputs), distances);
  const share = `${(table.confidenceLevel * 100).toFixed(0)}%`;
  const radius = `${Math.max(radiusKm, 1).toLocaleString("en-US", { maximumFractionDigits: 0 })} km`;
  const words = radiusKm < CONFIDENT_RADIUS_KM ? `${share} within ${radius}` : `not confident: ${share} only within ${radius}`;
  return { radiusKm, words };
}

// The distance within which the nearest cities hold `confidence_level` of the posterior (the farthest where none do).
function posteriorRadius(table, posterior, distances) {
  const order = [...distances.keys()].sort((a, b) => distances[a] - distances[b] || a - b);
  let mass = 0;
  const reached = order.find((row) => (mass += posterior[row]) >= table.confidenceLevel);
  return reached === undefined ? Math.max(...distances) : distances[reached];
}

function haversineKm(lat1, lon1, lat2, lon2) {
  const radians = Math.PI / 180;
  const a =
    Math.sin(((lat2 - lat1) * radians) / 2) ** 2 +
    Math.cos(lat1 * radians) * Math.cos(lat2 * radians) * Math.sin(((lon2 - lon1) * radians) / 2) ** 2;
  return 2 * EARTH_RADIUS_KM * Math.asin(Math.sqrt(Math.min(Math.max(a, 0), 1)));
}

// The greedy order: countries by logit, then regions by logit, then cities by logit (the paper's decision first).
function greedyOrder(table, outputs) {
  const { country_logits: countryLogits, region_logits: regionLogits, city_logits: cityLogits } = outputs;
  const rows = [...Array(table.numCities).keys()];
  return rows.sort((a, b) => {
    const [countryA, countryB] = [table.city_countries[a], table.city_countries[b]];
    let order = countryLogits[countryB] - countryLogits[countryA] || countryA - countryB;
    if (!order && table.hasRegions) {
      const [regionA, regionB] = [table.city_regions[a], table.city_regions[b]];
      order = regionLogits[regionB] - regionLogits[regionA] || regionA - regionB;
    }
    return order || cityLogits[b] - cityLogits[a] || a - b;
  });
}

// One image's `topK` answers under `decision`, best first, with the fields of the Python pipeline's answers.
export function rankAnswers(table, outputs, decision, topK) {
  if (!DECISIONS.includes(decision)) throw new Error(`Unknown decision ${decision}; this page ranks by ${DECISIONS.join(", ")}.`);
  const level = levels(table, outputs);
  const joint = jointProbabilities(outputs.logits);
  const posterior = confidencePosterior(table, outputs);
  const k = Math.min(topK, table.numCities);
  const byJoint = [...Array(table.numCities).keys()].sort((a, b) => joint[b] - joint[a] || a - b);
  let order;
  let criterion = null;
  if (decision === "greedy") {
    order = greedyOrder(table, outputs).slice(0, k);
  } else if (decision === "joint") {
    order = byJoint.slice(0, k);
  } else {
    // As `decisions._by_criterion`: the most probable cities ordered by the rule's criterion, then the next most
    // probable by joint probability, so that no answer depends on topK. "expected_distance" (the Bayes decision for
    // the mean error) weighs the great-circle distance by their renormalised joint posterior, smallest first;
    // "within_km" takes the posterior mass within config.decision_radius_km, largest first.
    const candidates = Math.min(table.expectedDistanceCandidates, table.numCities);
    const weighed = byJoint.slice(0, candidates);
    const pool = byJoint.slice(0, Math.max(k, candidates));
    const mass = weighed.reduce((sum, row) => sum + joint[row], 0);
    const lat = table.city_latitudes;
    const lon = table.city_longitudes;
    const value =
      decision === "expected_distance"
        ? (row) => weighed.reduce((sum, other) => sum + (joint[other] / mass) * haversineKm(lat[row], lon[row], lat[other], lon[other]), 0)
        : (row) => -massWithin(table, row, posterior, [table.decisionRadiusKm])[0];
    const values = new Map(pool.map((row) => [row, value(row)]));
    const position = new Map(pool.map((row, index) => [row, index]));
    const chosen = [...weighed].sort((a, b) => values.get(a) - values.get(b) || position.get(a) - position.get(b));
    order = chosen.concat(pool.slice(candidates)).slice(0, k);
    criterion = order.map((row) => Math.abs(values.get(row)));
  }
  return order.map((row, rank) => {
    const country = table.city_countries[row];
    const answer = { label: table.labels[row], country: table.country_names[country], country_code: table.country_codes[country] };
    if (table.hasRegions) answer.region = table.region_names[table.city_regions[row]];
    Object.assign(answer, {
      city: table.city_names[row],
      latitude: table.city_latitudes[row],
      longitude: table.city_longitudes[row],
      score: decision === "greedy" ? Math.exp(level.city[row]) : decision === "within_km" ? criterion[rank] : joint[row],
      country_score: Math.exp(level.country[row]),
    });
    if (table.hasRegions) answer.region_score = Math.exp(level.region[row]);
    answer.joint_probability = joint[row];
    Object.assign(answer, confidence(table, row, posterior));
    if (decision === "expected_distance") answer.expected_distance_km = criterion[rank];
    return answer;
  });
}
