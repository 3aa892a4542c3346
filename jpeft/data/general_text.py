"""General English prose for measuring forgetting.

``GENERAL_TEXT`` is a fixed set of short general-knowledge paragraphs (no math word problems) that ships with the
project; the mean per-token loss of a model on it before and after fine-tuning estimates how much general language
ability the fine-tuning cost. ``load_general_text`` returns it, or reads another corpus from a file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional, Union

__all__ = ["GENERAL_TEXT", "load_general_text"]

GENERAL_TEXT: tuple[str, ...] = (
  "The Amazon River flows across northern South America, from the Andes mountains of Peru to the Atlantic Ocean in "
  "Brazil. It carries more water than any other river on Earth, delivering roughly a fifth of all the fresh water "
  "that rivers pour into the oceans. Its basin covers about seven million square kilometres and holds the largest "
  "tropical rainforest in the world. Geographers still argue about whether the Amazon or the Nile is the longer "
  "river, because the answer depends on where the true source is placed. No bridge crosses the main channel of "
  "the Amazon.",
  "Plants, algae and some bacteria capture the energy of sunlight through photosynthesis. Inside the chloroplasts "
  "of a leaf, the pigment chlorophyll absorbs mostly red and blue light and reflects green, which is why most "
  "leaves look green to us. The absorbed energy is used to split water molecules, releasing oxygen as a "
  "by-product, and to turn carbon dioxide from the air into sugars. These sugars feed the plant and, through food "
  "chains, nearly every animal on land. Almost all of the oxygen in the atmosphere was produced by photosynthesis "
  "over billions of years.",
  "The ancient Romans built aqueducts to carry fresh water from distant springs and rivers into their cities. Most "
  "of an aqueduct's length ran underground or along the ground in covered channels; the famous arched bridges were "
  "needed only where the water had to cross a valley. The channels sloped very gently, sometimes dropping only a "
  "few centimetres over a hundred metres, so that gravity alone kept the water moving. Rome itself was eventually "
  "supplied by eleven aqueducts, which fed public fountains, baths and the houses of wealthy citizens.",
  "Baking bread starts with flour, water, salt and yeast. When the dough is kneaded, proteins in the wheat flour "
  "form a stretchy network called gluten. The yeast feeds on sugars in the flour and releases carbon dioxide, which "
  "is trapped by the gluten and makes the dough rise. In the hot oven the gas bubbles expand, the yeast dies and "
  "the starches set, fixing the light, open texture of the crumb. The brown crust forms through the Maillard "
  "reaction, a group of chemical changes between sugars and proteins that also creates much of the aroma of fresh "
  "bread.",
  "A volcano forms where molten rock from deep inside the Earth reaches the surface. Many volcanoes sit along the "
  "edges of tectonic plates, especially around the Pacific Ocean in a belt often called the Ring of Fire. Others, "
  "such as those of Hawaii, grow above hot spots in the middle of a plate. Eruptions can be gentle, with streams of "
  "runny lava, or violently explosive when thick, gas-rich magma shatters into ash. Volcanic soils are often very "
  "fertile, which is one reason people have farmed the slopes of active volcanoes for thousands of years.",
  "A honeybee colony can contain tens of thousands of workers, a single queen and, in summer, a few hundred males "
  "called drones. Worker bees change jobs as they age: young bees clean cells and feed larvae, middle-aged bees "
  "build comb and guard the entrance, and the oldest bees fly out to collect nectar and pollen. A forager that "
  "finds a good patch of flowers returns to the hive and performs a waggle dance, whose direction and duration tell "
  "her sisters where the food is. Honey is nectar that the bees have thickened by evaporating most of its water.",
  "Around 1440, Johannes Gutenberg, a goldsmith from Mainz in Germany, developed a way of printing with movable "
  "metal type. Each letter was cast separately, so the pieces could be arranged into pages, inked, pressed onto "
  "paper and then reused. Combined with an oil-based ink and a press adapted from those used to make wine, his "
  "method produced books far faster and more cheaply than copying by hand. Within a few decades print shops had "
  "spread to cities across Europe, and the wider availability of books helped fuel the Renaissance, the "
  "Reformation and the growth of science.",
  "Water on Earth moves in a continuous cycle. Heat from the Sun evaporates water from oceans, lakes and soil, and "
  "plants release more through their leaves. As the moist air rises it cools, and the vapour condenses into tiny "
  "droplets that form clouds. When the droplets grow heavy enough, they fall as rain, snow or hail. Some of this "
  "water runs off into rivers, some soaks into the ground to refill underground aquifers, and some is locked away "
  "for long periods in glaciers and ice sheets before it eventually returns to the sea.",
  "The Great Wall of China is not a single wall but a collection of fortifications built by different dynasties "
  "over roughly two thousand years. The earliest sections date to the seventh century BCE, and the first emperor "
  "of the Qin dynasty joined several of them together in the third century BCE. Most of the brick and stone wall "
  "that visitors walk on today was built during the Ming dynasty, between the fourteenth and seventeenth "
  "centuries. Despite a popular claim, the wall is generally not visible to the naked eye from orbit, because it "
  "is narrow and close in colour to the land around it.",
  "The human heart is a muscular pump about the size of a fist. It has four chambers: two upper atria, which "
  "receive blood, and two lower ventricles, which push it out. The right side sends oxygen-poor blood to the lungs, "
  "where it picks up oxygen and gives off carbon dioxide, while the left side pumps oxygen-rich blood to the rest "
  "of the body. Valves between the chambers keep the blood flowing in one direction. At rest, an adult heart "
  "usually beats sixty to a hundred times a minute, which adds up to about one hundred thousand beats a day.",
  "The Sahara in northern Africa is the largest hot desert in the world, covering about nine million square "
  "kilometres, an area comparable to that of the United States. Only a small part of it is covered by sand dunes; "
  "much of the desert consists of rocky plateaus, gravel plains and mountains. Days can be scorching, while nights "
  "can be cold because dry air and clear skies let heat escape quickly. The Sahara has not always been dry: several "
  "thousand years ago it was much greener, with lakes and grasslands, as ancient rock paintings of cattle, giraffes "
  "and swimmers show.",
  "Ocean tides are caused mainly by the gravitational pull of the Moon, with a smaller contribution from the Sun. "
  "The Moon pulls slightly harder on the side of the Earth facing it than on the far side, which stretches the "
  "oceans into two bulges. As the Earth turns through these bulges, most coastlines see two high tides and two low "
  "tides roughly every day. When the Sun and Moon line up at new and full moon, their effects add together and "
  "produce especially large spring tides; when they pull at right angles, the weaker neap tides occur.",
  "Olive oil has been pressed around the Mediterranean Sea for thousands of years. The fruit is harvested in autumn "
  "and early winter, crushed into a paste together with the stones, and then mixed and pressed or spun to separate "
  "the oil from the water and solids. Extra virgin olive oil is made by mechanical means alone, without heat or "
  "chemical solvents, and must meet strict standards for acidity and flavour. In the kitchen it is used for frying, "
  "roasting and dressing salads, and good oils can taste fruity, grassy, bitter or peppery.",
  "In 1609 Galileo Galilei heard about a Dutch invention that made distant objects appear closer and built his own "
  "improved telescopes. Pointing them at the night sky, he saw mountains and craters on the Moon, countless faint "
  "stars in the Milky Way, and four moons circling Jupiter. He also found that Venus shows phases like the Moon, "
  "which was hard to explain if both Venus and the Sun travelled around the Earth. These observations supported "
  "the idea, put forward earlier by Copernicus, that the planets orbit the Sun, and they brought Galileo into "
  "conflict with the Church.",
  "Tea comes from the leaves of a single plant, Camellia sinensis, which is native to parts of East and South Asia. "
  "Green, black, oolong and white teas differ mainly in how the leaves are processed after picking. For green tea, "
  "the leaves are heated soon after harvest to stop oxidation, which preserves their fresh, grassy character. For "
  "black tea, the leaves are rolled and allowed to oxidise fully, turning them dark and giving a stronger, maltier "
  "flavour. Herbal infusions such as chamomile or peppermint are often called tea, but they contain no leaves from "
  "the tea plant.",
  "Penguins are flightless birds found almost entirely in the Southern Hemisphere. Their wings have evolved into "
  "stiff flippers, and their dense bones and streamlined bodies make them skilful swimmers that chase fish, squid "
  "and krill underwater. The emperor penguin, the largest species, breeds during the Antarctic winter: after the "
  "female lays a single egg, the male balances it on his feet under a fold of warm skin and goes without food for "
  "about two months while it incubates. Not all penguins live in icy places; the Galapagos penguin lives near the "
  "equator.",
  "In 1215, rebellious English barons forced King John to accept a charter at Runnymede, a meadow beside the River "
  "Thames. The document, later known as Magna Carta, promised to protect the rights of the church, limited certain "
  "payments to the crown, and declared that no free man would be imprisoned or punished except by the lawful "
  "judgement of his peers or the law of the land. The pope annulled it within about ten weeks, but revised "
  "versions were issued again in later years. Over the centuries, Magna Carta became a symbol of the principle "
  "that rulers are subject to the law.",
  "A rainbow appears when sunlight shines into falling raindrops while the Sun is behind the observer. Light "
  "entering a drop is bent, reflected off the back of the drop, and bent again as it leaves. Because each colour "
  "bends by a slightly different amount, white sunlight is spread into a band of colours, with red on the outside "
  "of the arc and violet on the inside. The bow always forms at an angle of about 42 degrees from the point "
  "directly opposite the Sun. Sometimes a fainter second rainbow appears outside the first, with its colours in "
  "reverse order.",
  "Composting turns kitchen scraps and garden waste into a dark, crumbly material that enriches the soil. Bacteria, "
  "fungi, worms and insects break down the organic matter, and they work best with a mix of nitrogen-rich green "
  "materials, such as vegetable peelings and grass clippings, and carbon-rich brown materials, such as dry leaves, "
  "straw and cardboard. A compost heap also needs air and moisture; turning it now and then supplies oxygen and "
  "speeds up decay. A well-managed heap becomes quite warm in the middle, and the finished compost is usually ready "
  "within a few months to a year.",
  "Mount Everest, on the border between Nepal and the Tibet region of China, is the highest mountain above sea "
  "level, at about 8,849 metres. It is called Sagarmatha in Nepali and Chomolungma in Tibetan. Edmund Hillary of "
  "New Zealand and Tenzing Norgay, a Sherpa climber from Nepal, made the first confirmed ascent to the summit on 29 "
  "May 1953. The air near the top holds only about a third of the oxygen available at sea level, so most climbers "
  "carry bottled oxygen. The mountain is still rising by a few millimetres a year as India pushes into Asia.",
  "Vaccines train the immune system to recognise a germ without causing the illness it normally brings. They may "
  "contain weakened or inactivated microbes, purified pieces of them, or genetic instructions that let the body's "
  "own cells make a harmless piece of the germ for a short time. The immune system responds by producing "
  "antibodies and memory cells, so that a later encounter with the real germ triggers a faster and stronger "
  "defence. In 1796 Edward Jenner showed that material from cowpox could protect people against smallpox, a "
  "disease that vaccination campaigns finally eliminated worldwide by 1980.",
  "The Silk Road was not a single road but a network of trade routes linking China with Central Asia, Persia, the "
  "Middle East and the Mediterranean world. Chinese silk was one of its most famous goods, but merchants also "
  "carried spices, glass, horses, paper, precious metals and much more. Few traders covered the whole distance; "
  "goods usually passed through many hands in oasis towns and caravan cities along the way. Ideas travelled the "
  "same routes, helping Buddhism spread from India into China and carrying techniques such as papermaking "
  "westward.",
  "The octopus is a soft-bodied mollusc with eight arms lined with suckers that can both grip and taste. It has "
  "three hearts and blue blood, which carries oxygen with a copper-based protein. Octopuses are known for their "
  "intelligence: in experiments they have solved puzzles, unscrewed jars and escaped from their tanks. Special "
  "skin cells let them change colour and texture in a fraction of a second, helping them hide from predators or "
  "surprise their prey. Most species live only a year or two, and females usually guard their eggs until they "
  "hatch and die soon afterwards.",
  "Rice is the staple food of more than half of the world's population, especially in Asia. Most rice is grown in "
  "flooded fields called paddies; the standing water helps control weeds and pests, although the plant itself does "
  "not need to be submerged to grow. Varieties differ in grain length and starch content: long-grain rice such as "
  "basmati cooks into separate, fluffy grains, while the short-grain rice used for sushi or risotto becomes soft "
  "and sticky. Brown rice keeps the bran layer that is removed to make white rice, giving it more fibre and a "
  "nuttier taste.",
  "In 1831 Michael Faraday discovered that moving a magnet near a coil of wire makes an electric current flow in "
  "the wire. This effect, called electromagnetic induction, is the principle behind electric generators and "
  "transformers. In a power station, steam, falling water or wind turns a turbine, which spins magnets and coils "
  "relative to each other and produces alternating current. Transformers then raise the voltage for long-distance "
  "transmission, because a high voltage reduces the energy lost as heat in the cables, and lower it again before "
  "the electricity reaches homes.",
  "For centuries, lighthouses have warned ships away from dangerous rocks and guided them into harbours. One of the "
  "most famous ancient examples was the Pharos of Alexandria in Egypt, which stood for many centuries before "
  "earthquakes brought it down. Early lighthouses burned wood, coal or oil. In the nineteenth century the French "
  "engineer Augustin Fresnel designed a lens built from concentric rings of glass that focused the light into a "
  "powerful beam visible far out at sea. Each lighthouse shows its own pattern of flashes, so sailors can identify "
  "it at night.",
  "Coffee comes from the seeds of the fruit of the coffee plant, a fruit often called a cherry. Two species "
  "dominate world production: arabica, valued for its more delicate and complex flavour, and robusta, which is "
  "hardier and contains more caffeine. After harvest the seeds are separated from the fruit, dried and then "
  "roasted, a process that develops hundreds of aroma compounds and turns the beans from green to brown. According "
  "to legend, a goat herder in Ethiopia noticed that his animals grew lively after eating coffee berries, and by "
  "the fifteenth century coffee was being brewed in Yemen.",
  "The Earth's outer shell is broken into large slabs called tectonic plates, which move a few centimetres a year, "
  "about as fast as fingernails grow. Where plates pull apart, as along the Mid-Atlantic Ridge, molten rock rises "
  "to form new ocean floor. Where they collide, one plate may sink beneath the other, creating deep ocean trenches "
  "and chains of volcanoes, or the crust may crumple into high mountain ranges such as the Himalayas. Where plates "
  "slide past each other, as along the San Andreas Fault in California, built-up strain is released in "
  "earthquakes.",
  "The Great Pyramid of Giza was built for the pharaoh Khufu around 2560 BCE and remained the tallest structure "
  "made by people for nearly four thousand years. It originally stood about 146 metres high and contains an "
  "estimated 2.3 million blocks of stone. Archaeologists have uncovered the remains of workers' settlements "
  "nearby, with bakeries and cemeteries, which suggest that the pyramid was raised by organised crews of labourers "
  "who were housed and fed, rather than by slaves, as was once widely believed.",
  "Chess developed from an Indian game called chaturanga, which was played by the sixth century CE and spread to "
  "Persia, then to the Arab world and Europe. Over the centuries the rules changed; near the end of the fifteenth "
  "century the queen and the bishop gained their modern long-range moves, which made the game much faster. A game "
  "begins with sixteen pieces for each player on a board of sixty-four squares. The aim is to checkmate the "
  "opposing king, attacking it in such a way that it has no legal means of escape.",
  "Cheese is made by curdling milk, usually with an enzyme called rennet and with bacteria that turn milk sugar "
  "into lactic acid. The milk separates into solid curds and liquid whey. The curds are cut, drained, salted and "
  "often pressed into moulds. Fresh cheeses such as ricotta are eaten within days, while hard cheeses like "
  "Parmigiano Reggiano are aged for a year or more, as enzymes and microbes slowly break down proteins and fats "
  "into deeper flavours. The holes in Swiss-style cheeses come from carbon dioxide released by bacteria during "
  "ripening.",
  "The Moon orbits the Earth about once every 27 days relative to the stars, and it always shows us the same face "
  "because it turns once on its axis for each orbit. Its phases come from the changing angle between the Sun, the "
  "Earth and the Moon, which alters how much of the sunlit half we can see. The leading explanation for its origin "
  "is that it formed from debris thrown out when a body about the size of Mars collided with the young Earth. "
  "Between 1969 and 1972, twelve astronauts walked on its surface during the Apollo programme.",
  "The ancient Olympic Games were held at Olympia in Greece every four years, traditionally from 776 BCE, in honour "
  "of the god Zeus. Events included foot races, wrestling, boxing, chariot racing and the pentathlon. The modern "
  "Olympics were revived largely through the efforts of the French educator Pierre de Coubertin, and the first "
  "modern Games took place in Athens in 1896. Winter Games were added in 1924. The five interlocking rings of the "
  "Olympic flag, in blue, yellow, black, green and red on a white background, are among the most widely "
  "recognised symbols in the world.",
  "Bats are the only mammals capable of true powered flight. Their wings are made of thin skin stretched between "
  "very long finger bones. Many bat species hunt at night by echolocation: they give out high-pitched calls, mostly "
  "too high for people to hear, and listen to the echoes that bounce back from objects around them. From these "
  "echoes they can judge the size, distance and movement of an insect in complete darkness. Other bats feed on "
  "fruit or nectar and play an important role in pollinating plants and spreading seeds, including those of agave, "
  "durian and wild bananas.",
  "Iceland is an island nation in the North Atlantic that sits on the Mid-Atlantic Ridge, where the North American "
  "and Eurasian plates are moving apart. As a result the country has many active volcanoes, hot springs and "
  "geysers; the word geyser itself comes from Geysir, a hot spring in the southwest of the island. Geothermal "
  "energy heats most Icelandic homes, and nearly all of the country's electricity comes from renewable sources. "
  "Its parliament, the Althing, was founded in 930 and is often described as one of the oldest surviving "
  "parliaments in the world.",
  "Positions on Earth are usually given as latitude and longitude. Latitude measures how far north or south a place "
  "lies from the equator, from zero degrees at the equator to ninety degrees at the poles. Longitude measures the "
  "angle east or west of the prime meridian, which by an international agreement of 1884 passes through Greenwich "
  "in London. Sailors could find their latitude fairly easily from the height of the Sun or the Pole Star, but "
  "measuring longitude at sea remained a serious problem until John Harrison built accurate marine clocks in the "
  "eighteenth century.",
  "Tomatoes originated in western South America and were domesticated in Mexico before Spanish explorers carried "
  "them to Europe in the sixteenth century. For a long time many Europeans grew them only as ornamental plants, "
  "partly because they belong to the nightshade family, which includes some poisonous species. Botanically the "
  "tomato is a fruit, since it develops from a flower and contains seeds, but in 1893 the United States Supreme "
  "Court ruled that it should be taxed as a vegetable because it is used like one in cooking. Today tomatoes are "
  "central to Italian, Mexican and many other cuisines.",
  "Sound is a wave of pressure that travels through a medium such as air, water or solid material. In air at room "
  "temperature it moves at about 343 metres per second, but it travels more than four times faster in water and "
  "faster still in steel. Sound cannot cross the vacuum of space, because there are no particles to carry the "
  "vibrations. The pitch we hear depends on the frequency of the wave, measured in hertz; young people with healthy "
  "hearing can detect roughly 20 to 20,000 hertz, and the upper limit tends to fall with age.",
  "Antarctica is the coldest, windiest and, on average, highest continent. About 98 percent of it is covered by an "
  "ice sheet that is more than four kilometres thick in places and holds most of the world's fresh water. Despite "
  "all that ice, much of the interior receives so little snowfall that it counts as a desert. The continent has no "
  "permanent residents, but thousands of scientists and support staff live at research stations during the "
  "summer. Under the Antarctic Treaty, signed in 1959, Antarctica is reserved for peaceful purposes and scientific "
  "research.",
  "The Library of Alexandria, founded in Egypt in the third century BCE under the Ptolemaic kings, set out to "
  "collect copies of every important book in the known world. Scholars working there made major advances in "
  "mathematics, astronomy, geography and literature; Eratosthenes, one of its chief librarians, estimated the "
  "circumference of the Earth with remarkable accuracy. The library did not vanish in a single dramatic fire, as "
  "legend often suggests. It declined over several centuries through cuts in funding, political turmoil and damage "
  "during wars.",
  "Soap molecules have two different ends: one is attracted to water, and the other, a long chain of carbon and "
  "hydrogen atoms, is attracted to oil and grease. When you wash your hands, the oily ends bury themselves in "
  "grease and dirt while the water-loving ends face outward, forming tiny clusters called micelles that can be "
  "rinsed away. Soap also breaks apart the fatty outer layer of many viruses and bacteria. Traditional soap is made "
  "by heating fats or oils with a strong alkali, a reaction known as saponification.",
  "Every autumn, millions of monarch butterflies in eastern North America fly south, some travelling more than four "
  "thousand kilometres to spend the winter in mountain forests in central Mexico. There they cluster by the "
  "thousands on fir trees. Remarkably, no single butterfly makes the full round trip: the journey back north in "
  "spring is completed over several generations. Monarch caterpillars feed only on milkweed, whose toxins make "
  "both the caterpillars and the adult butterflies distasteful to many birds.",
)


def load_general_text(path: Optional[Union[str, os.PathLike]] = None, *, limit: Optional[int] = None) -> list[str]:
  """Paragraphs for the forgetting measurement.

  With no ``path``, the built-in ``GENERAL_TEXT``. Otherwise the file is read as: ``.jsonl`` with one object per
  line and a ``"text"`` field; ``.json`` holding a list of strings or of objects with a ``"text"`` field; any other
  file as plain text split into paragraphs on blank lines. Empty paragraphs are dropped; ``limit`` keeps the first
  ones.
  """
  if limit is not None and limit < 0:
    raise ValueError(f"limit must be >= 0, got {limit}")
  if path is None:
    texts = list(GENERAL_TEXT)
  else:
    p = Path(path).expanduser()
    if not p.is_file():
      raise FileNotFoundError(f"general text file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
      texts = []
      with open(p, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
          if not line.strip():
            continue
          texts.append(_text_of(json.loads(line), f"{p}:{lineno}"))
    elif suffix == ".json":
      data = json.loads(p.read_text(encoding="utf-8"))
      if not isinstance(data, list):
        raise ValueError(f"{p}: expected a JSON list of strings or of objects with a 'text' field")
      texts = [_text_of(row, f"{p}[{i}]") for i, row in enumerate(data)]
    else:
      content = p.read_text(encoding="utf-8").replace("\r\n", "\n")
      texts = [para.strip() for para in re.split(r"\n\s*\n", content)]
    texts = [t for t in texts if t.strip()]
  return texts[:limit] if limit is not None else texts


def _text_of(row, where: str) -> str:
  if isinstance(row, str):
    return row
  if isinstance(row, dict) and isinstance(row.get("text"), str):
    return row["text"]
  found = sorted(row) if isinstance(row, dict) else type(row).__name__
  raise ValueError(f"{where}: expected a 'text' field, found {found}")
