// The decision rules that need only the graph's outputs and the candidate table of config.json, ranked as the Python
// package's `decisions.rank_places` ranks them, with the fields of `answers.format_answers`. Ties go to the row listed
// first.

export const DECISIONS = ["joint", "greedy", "expected_distance"];
// geodesy.EARTH_RADIUS_KM: the sphere of the geodesic_accuracy metric.
const EARTH_RADIUS_KM = 6371.0088;

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
  const k = Math.min(topK, table.numCities);
  const byJoint = [...Array(table.numCities).keys()].sort((a, b) => joint[b] - joint[a] || a - b);
  let order;
  let distances = null;
  if (decision === "greedy") {
    order = greedyOrder(table, outputs).slice(0, k);
  } else if (decision === "joint") {
    order = byJoint.slice(0, k);
  } else {
    // The Bayes decision for the mean error: the expected great-circle distance to the true place under the joint
    // posterior over the most probable cities, renormalised; smallest first among them, then the next most probable
    // by joint probability, so that no answer depends on topK (as `decisions._by_criterion`).
    const candidates = Math.min(table.expectedDistanceCandidates, table.numCities);
    const weighed = byJoint.slice(0, candidates);
    const pool = byJoint.slice(0, Math.max(k, candidates));
    const mass = weighed.reduce((sum, row) => sum + joint[row], 0);
    const expected = new Map(
      pool.map((row) => [
        row,
        weighed.reduce(
          (sum, other) =>
            sum +
            (joint[other] / mass) *
              haversineKm(table.city_latitudes[row], table.city_longitudes[row], table.city_latitudes[other], table.city_longitudes[other]),
          0,
        ),
      ]),
    );
    const position = new Map(pool.map((row, index) => [row, index]));
    const chosen = [...weighed].sort((a, b) => expected.get(a) - expected.get(b) || position.get(a) - position.get(b));
    order = chosen.concat(pool.slice(candidates)).slice(0, k);
    distances = order.map((row) => expected.get(row));
  }
  return order.map((row, rank) => {
    const country = table.city_countries[row];
    const answer = { label: table.labels[row], country: table.country_names[country], country_code: table.country_codes[country] };
    if (table.hasRegions) answer.region = table.region_names[table.city_regions[row]];
    Object.assign(answer, {
      city: table.city_names[row],
      latitude: table.city_latitudes[row],
      longitude: table.city_longitudes[row],
      score: decision === "greedy" ? Math.exp(level.city[row]) : joint[row],
      country_score: Math.exp(level.country[row]),
    });
    if (table.hasRegions) answer.region_score = Math.exp(level.region[row]);
    answer.joint_probability = joint[row];
    if (distances) answer.expected_distance_km = distances[rank];
    return answer;
  });
}
