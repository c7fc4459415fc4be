"""Code tables (SNOMED CT, ICD-10-CM, LOINC, RxNorm, CVX) used by the synthetic generator."""

from __future__ import annotations

from typing import NamedTuple

SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CVX = "http://hl7.org/fhir/sid/cvx"
UCUM = "http://unitsofmeasure.org"
NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"
SYNTHEA_SYSTEM = "https://github.com/synthetichealth/synthea"
MRN_SYSTEM = "http://hospital.example.org/mrn"
SSN_SYSTEM = "http://hl7.org/fhir/sid/us-ssn"
DL_SYSTEM = "urn:oid:2.16.840.1.113883.4.3.25"
PASSPORT_SYSTEM = "http://hl7.org/fhir/sid/passport-USA"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
MARITAL = "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus"
OMB_RACE = "urn:oid:2.16.840.1.113883.6.238"
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VER = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
ADMIT_SOURCE = "http://terminology.hl7.org/CodeSystem/admit-source"
DISCHARGE_DISPOSITION = "http://terminology.hl7.org/CodeSystem/discharge-disposition"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
CLAIM_TYPE = "http://terminology.hl7.org/CodeSystem/claim-type"
PROCESS_PRIORITY = "http://terminology.hl7.org/CodeSystem/processpriority"
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ORG_TYPE = "http://terminology.hl7.org/CodeSystem/organization-type"
US_CORE_DOC_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category"

EXT_RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
EXT_ETHNICITY = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"
EXT_BIRTHSEX = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex"
EXT_MAIDEN = "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName"
EXT_BIRTHPLACE = "http://hl7.org/fhir/StructureDefinition/patient-birthPlace"
EXT_GEOLOCATION = "http://hl7.org/fhir/StructureDefinition/geolocation"


class Dx(NamedTuple):
    """A diagnosis coded in SNOMED CT and ICD-10-CM, optionally with a broader SNOMED code."""

    snomed: str
    snomed_display: str
    icd10: str
    icd10_display: str
    broader_snomed: tuple[str, str] | None = None


class Drug(NamedTuple):
    rxnorm: str
    display: str
    instructions: str


class Vital(NamedTuple):
    loinc: str
    display: str
    unit: str
    category: str


class Proc(NamedTuple):
    snomed: str
    display: str
    cost: float


class Vaccine(NamedTuple):
    cvx: str
    display: str


# Chronic conditions, in the order they are sampled (later ones depend on earlier ones).
CHRONIC: dict[str, Dx] = {
    "obesity": Dx("414916001", "Obesity (disorder)", "E66.9", "Obesity, unspecified"),
    "hypertension": Dx(
        "38341003",
        "Hypertensive disorder, systemic arterial (disorder)",
        "I10",
        "Essential (primary) hypertension",
    ),
    "hyperlipidemia": Dx(
        "55822004", "Hyperlipidemia (disorder)", "E78.5", "Hyperlipidemia, unspecified"
    ),
    "diabetes": Dx(
        "44054006",
        "Diabetes mellitus type 2 (disorder)",
        "E11.9",
        "Type 2 diabetes mellitus without complications",
    ),
    "afib": Dx(
        "49436004", "Atrial fibrillation (disorder)", "I48.91", "Unspecified atrial fibrillation"
    ),
    "heart_failure": Dx(
        "84114007", "Heart failure (disorder)", "I50.9", "Heart failure, unspecified"
    ),
    "copd": Dx(
        "13645005",
        "Chronic obstructive lung disease (disorder)",
        "J44.9",
        "Chronic obstructive pulmonary disease, unspecified",
    ),
    "ckd": Dx(
        "709044004",
        "Chronic kidney disease (disorder)",
        "N18.9",
        "Chronic kidney disease, unspecified",
    ),
    "asthma": Dx("195967001", "Asthma (disorder)", "J45.909", "Unspecified asthma, uncomplicated"),
    "depression": Dx(
        "35489007",
        "Depressive disorder (disorder)",
        "F32.9",
        "Major depressive disorder, single episode, unspecified",
    ),
    "breast_cancer": Dx(
        "254837009",
        "Malignant neoplasm of breast (disorder)",
        "C50.919",
        "Malignant neoplasm of unspecified site of unspecified female breast",
    ),
    "colon_cancer": Dx(
        "363406005",
        "Malignant tumor of colon (disorder)",
        "C18.9",
        "Malignant neoplasm of colon, unspecified",
    ),
    "lung_cancer": Dx(
        "93880001",
        "Primary malignant neoplasm of lung (disorder)",
        "C34.90",
        "Malignant neoplasm of unspecified part of unspecified bronchus or lung",
    ),
}

# Stage-specific CKD codes also carry the generic one, so either matches.
CKD_GENERIC = ("709044004", "Chronic kidney disease (disorder)")
CKD_STAGES: dict[int, Dx] = {
    2: Dx(
        "431856006",
        "Chronic kidney disease stage 2 (disorder)",
        "N18.2",
        "Chronic kidney disease, stage 2 (mild)",
        CKD_GENERIC,
    ),
    3: Dx(
        "433144002",
        "Chronic kidney disease stage 3 (disorder)",
        "N18.30",
        "Chronic kidney disease, stage 3 unspecified",
        CKD_GENERIC,
    ),
    4: Dx(
        "431857002",
        "Chronic kidney disease stage 4 (disorder)",
        "N18.4",
        "Chronic kidney disease, stage 4 (severe)",
        CKD_GENERIC,
    ),
}

# Conditions that count as major comorbidities for admissions and readmissions.
MAJOR_COMORBIDITIES = ("heart_failure", "copd", "ckd", "diabetes")
CANCERS = ("breast_cancer", "colon_cancer", "lung_cancer")

ACUTE_AMBULATORY: dict[str, Dx] = {
    "pharyngitis": Dx(
        "195662009", "Acute viral pharyngitis (disorder)", "J02.9", "Acute pharyngitis, unspecified"
    ),
    "bronchitis": Dx(
        "10509002", "Acute bronchitis (disorder)", "J20.9", "Acute bronchitis, unspecified"
    ),
    "sinusitis": Dx(
        "444814009", "Viral sinusitis (disorder)", "J01.90", "Acute sinusitis, unspecified"
    ),
    "cystitis": Dx(
        "307426000",
        "Acute infective cystitis (disorder)",
        "N30.00",
        "Acute cystitis without hematuria",
    ),
    "otitis": Dx(
        "65363002",
        "Otitis media (disorder)",
        "H66.90",
        "Otitis media, unspecified, unspecified ear",
    ),
}

EMERGENCY: dict[str, Dx] = {
    "chest_pain": Dx("29857009", "Chest pain (finding)", "R07.9", "Chest pain, unspecified"),
    "syncope": Dx("271594007", "Syncope (disorder)", "R55", "Syncope and collapse"),
    "ankle_sprain": Dx(
        "44465007",
        "Sprain of ankle (disorder)",
        "S93.409A",
        "Sprain of unspecified ligament of unspecified ankle, initial encounter",
    ),
    "hand_laceration": Dx(
        "283385000",
        "Laceration of hand (disorder)",
        "S61.419A",
        "Laceration without foreign body of unspecified hand, initial encounter",
    ),
    "concussion": Dx(
        "62106007",
        "Concussion with no loss of consciousness (disorder)",
        "S06.0X0A",
        "Concussion without loss of consciousness, initial encounter",
    ),
}

INPATIENT: dict[str, Dx] = {
    "pneumonia": Dx(
        "233604007", "Pneumonia (disorder)", "J18.9", "Pneumonia, unspecified organism"
    ),
    "sepsis": Dx("91302008", "Sepsis (disorder)", "A41.9", "Sepsis, unspecified organism"),
    "mi": Dx(
        "22298006",
        "Myocardial infarction (disorder)",
        "I21.9",
        "Acute myocardial infarction, unspecified",
    ),
    "stroke": Dx(
        "230690007",
        "Cerebrovascular accident (disorder)",
        "I63.9",
        "Cerebral infarction, unspecified",
    ),
    "hip_fracture": Dx(
        "5913000",
        "Fracture of neck of femur (disorder)",
        "S72.009A",
        "Fracture of unspecified part of neck of unspecified femur, initial encounter",
    ),
    "aki": Dx(
        "14669001",
        "Acute renal failure syndrome (disorder)",
        "N17.9",
        "Acute kidney failure, unspecified",
    ),
    "copd_exacerbation": Dx(
        "195951007",
        "Acute exacerbation of chronic obstructive airways disease (disorder)",
        "J44.1",
        "Chronic obstructive pulmonary disease with (acute) exacerbation",
    ),
    "hyperglycemia": Dx(
        "80394007", "Hyperglycemia (disorder)", "R73.9", "Hyperglycemia, unspecified"
    ),
}

# Encounter type codes (SNOMED CT procedures, as Synthea uses them).
ENCOUNTER_TYPES: dict[str, tuple[str, str]] = {
    "wellness_adult": ("162673000", "General examination of patient (procedure)"),
    "wellness_child": ("410620009", "Well child visit (procedure)"),
    "followup": ("390906007", "Follow-up encounter (procedure)"),
    "diagnosis": ("185349003", "Encounter for check up (procedure)"),
    "acute": ("185345009", "Encounter for symptom (procedure)"),
    "emergency": ("50849002", "Emergency room admission (procedure)"),
    "inpatient": ("32485007", "Hospital admission (procedure)"),
}

ENCOUNTER_CLASS: dict[str, tuple[str, str]] = {
    "AMB": ("AMB", "ambulatory"),
    "EMER": ("EMER", "emergency"),
    "IMP": ("IMP", "inpatient encounter"),
}

VITALS: dict[str, Vital] = {
    "height": Vital("8302-2", "Body height", "cm", "vital-signs"),
    "weight": Vital("29463-7", "Body weight", "kg", "vital-signs"),
    "bmi": Vital("39156-5", "Body mass index (BMI) [Ratio]", "kg/m2", "vital-signs"),
    "heart_rate": Vital("8867-4", "Heart rate", "/min", "vital-signs"),
    "hba1c": Vital("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", "laboratory"),
    "glucose": Vital("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", "laboratory"),
    "creatinine": Vital(
        "2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", "laboratory"
    ),
    "egfr": Vital(
        "33914-3",
        "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum or Plasma "
        "by Creatinine-based formula (MDRD)",
        "mL/min/{1.73_m2}",
        "laboratory",
    ),
    "ldl": Vital(
        "18262-6",
        "Cholesterol in LDL [Mass/volume] in Serum or Plasma by Direct assay",
        "mg/dL",
        "laboratory",
    ),
}
BP_PANEL = ("85354-9", "Blood pressure panel with all children optional")
SYSTOLIC = ("8480-6", "Systolic blood pressure")
DIASTOLIC = ("8462-4", "Diastolic blood pressure")

DRUGS: dict[str, Drug] = {
    "metformin": Drug(
        "860975",
        "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet",
        "Take 1 tablet by mouth daily with the evening meal",
    ),
    "insulin_glargine": Drug(
        "311041",
        "insulin glargine 100 UNT/ML Injectable Solution",
        "Inject 10 units subcutaneously at bedtime",
    ),
    "lisinopril": Drug("314076", "lisinopril 10 MG Oral Tablet", "Take 1 tablet by mouth daily"),
    "amlodipine": Drug("197361", "amlodipine 5 MG Oral Tablet", "Take 1 tablet by mouth daily"),
    "hydrochlorothiazide": Drug(
        "310798", "hydrochlorothiazide 25 MG Oral Tablet", "Take 1 tablet by mouth every morning"
    ),
    "atorvastatin": Drug(
        "617312", "atorvastatin 10 MG Oral Tablet", "Take 1 tablet by mouth at bedtime"
    ),
    "metoprolol": Drug(
        "866924", "metoprolol tartrate 25 MG Oral Tablet", "Take 1 tablet by mouth twice daily"
    ),
    "furosemide": Drug("310429", "furosemide 20 MG Oral Tablet", "Take 1 tablet by mouth daily"),
    "warfarin": Drug(
        "855332", "warfarin sodium 5 MG Oral Tablet", "Take as directed; dose adjusted to INR"
    ),
    "digoxin": Drug("197604", "digoxin 0.125 MG Oral Tablet", "Take 1 tablet by mouth daily"),
    "albuterol": Drug(
        "745752",
        "albuterol 0.09 MG/ACTUAT Metered Dose Inhaler, 200 ACTUAT",
        "Inhale 2 puffs every 4 hours as needed for wheezing",
    ),
    "fluticasone": Drug(
        "895994",
        "120 ACTUAT fluticasone propionate 0.044 MG/ACTUAT Metered Dose Inhaler",
        "Inhale 2 puffs twice daily",
    ),
    "sertraline": Drug("312940", "sertraline 50 MG Oral Tablet", "Take 1 tablet by mouth daily"),
    "fluoxetine": Drug("310385", "fluoxetine 20 MG Oral Capsule", "Take 1 capsule by mouth daily"),
    "tamoxifen": Drug(
        "198240", "tamoxifen 10 MG Oral Tablet", "Take 1 tablet by mouth twice daily"
    ),
    "aspirin": Drug("243670", "aspirin 81 MG Oral Tablet", "Take 1 tablet by mouth daily"),
    "clopidogrel": Drug("309362", "clopidogrel 75 MG Oral Tablet", "Take 1 tablet by mouth daily"),
    "amoxicillin": Drug(
        "308182",
        "amoxicillin 250 MG Oral Capsule",
        "Take 1 capsule by mouth three times daily for 10 days",
    ),
    "amox_clav": Drug(
        "562251",
        "amoxicillin 250 MG / clavulanate 125 MG Oral Tablet",
        "Take 1 tablet by mouth every 8 hours for 7 days",
    ),
    "acetaminophen": Drug(
        "313782",
        "acetaminophen 325 MG Oral Tablet",
        "Take 2 tablets by mouth every 6 hours as needed for pain",
    ),
}

# Drugs started when a chronic condition is diagnosed (each with a probability).
CHRONIC_DRUGS: dict[str, tuple[tuple[str, float], ...]] = {
    "hypertension": (("lisinopril", 0.6), ("amlodipine", 0.35), ("hydrochlorothiazide", 0.25)),
    "hyperlipidemia": (("atorvastatin", 0.75),),
    "diabetes": (("metformin", 0.85), ("insulin_glargine", 0.2)),
    "afib": (("warfarin", 0.6), ("digoxin", 0.2), ("metoprolol", 0.5)),
    "heart_failure": (("furosemide", 0.85), ("metoprolol", 0.6), ("lisinopril", 0.5)),
    "copd": (("albuterol", 0.9), ("fluticasone", 0.4)),
    "ckd": (("lisinopril", 0.4), ("furosemide", 0.2)),
    "asthma": (("albuterol", 0.95), ("fluticasone", 0.5)),
    "depression": (("sertraline", 0.55), ("fluoxetine", 0.3)),
    "breast_cancer": (("tamoxifen", 0.7),),
}

ACUTE_DRUGS: dict[str, tuple[str, ...]] = {
    "pharyngitis": ("amoxicillin", "acetaminophen"),
    "bronchitis": ("acetaminophen",),
    "sinusitis": ("amox_clav",),
    "cystitis": ("amox_clav",),
    "otitis": ("amoxicillin",),
    "ankle_sprain": ("acetaminophen",),
    "hand_laceration": ("acetaminophen",),
    "concussion": ("acetaminophen",),
    "pneumonia": ("amox_clav",),
    "sepsis": ("amox_clav",),
    "mi": ("aspirin", "clopidogrel"),
    "stroke": ("aspirin",),
    "heart_failure": ("furosemide",),
    "copd_exacerbation": ("albuterol",),
}

PROCEDURES: dict[str, Proc] = {
    "med_reconciliation": Proc("430193006", "Medication reconciliation (procedure)", 90.0),
    "depression_screening": Proc("171207006", "Depression screening (procedure)", 45.0),
    "needs_assessment": Proc(
        "710824005", "Assessment of health and social care needs (procedure)", 60.0
    ),
    "colonoscopy": Proc("73761001", "Colonoscopy (procedure)", 1450.0),
    "mammography": Proc("71651007", "Mammography (procedure)", 280.0),
    "spirometry": Proc("127783003", "Spirometry (procedure)", 120.0),
    "echocardiography": Proc("40701008", "Echocardiography (procedure)", 950.0),
    "ecg": Proc("29303009", "Electrocardiographic procedure (procedure)", 160.0),
    "chest_xray": Proc("399208008", "Plain X-ray of chest (procedure)", 210.0),
    "throat_culture": Proc("117015009", "Throat culture (procedure)", 75.0),
    "pci": Proc("415070008", "Percutaneous coronary intervention (procedure)", 18500.0),
    "ablation": Proc("18286008", "Catheter ablation of tissue of heart (procedure)", 22000.0),
    "dialysis": Proc("265764009", "Renal dialysis (procedure)", 650.0),
    "hip_repair": Proc("52734007", "Total replacement of hip (procedure)", 16000.0),
}

# Procedures done during an inpatient stay, by admission reason.
INPATIENT_PROCEDURES: dict[str, tuple[str, ...]] = {
    "pneumonia": ("chest_xray",),
    "sepsis": ("chest_xray",),
    "mi": ("ecg", "pci"),
    "stroke": ("ecg",),
    "hip_fracture": ("hip_repair",),
    "aki": ("dialysis",),
    "copd_exacerbation": ("chest_xray", "spirometry"),
    "heart_failure": ("echocardiography", "ecg"),
    "hyperglycemia": (),
}

VACCINES: dict[str, Vaccine] = {
    "influenza": Vaccine("140", "Influenza, seasonal, injectable, preservative free"),
    "td": Vaccine("113", "Td (adult) preservative free"),
    "tdap": Vaccine("115", "Tdap"),
    "pcv13": Vaccine("133", "Pneumococcal conjugate PCV 13"),
    "ppsv23": Vaccine("33", "pneumococcal polysaccharide vaccine, 23 valent"),
    "zoster": Vaccine("187", "zoster vaccine recombinant"),
    "hep_b": Vaccine("08", "Hep B, adolescent or pediatric"),
    "dtap": Vaccine("20", "DTaP"),
    "ipv": Vaccine("10", "IPV"),
    "mmr": Vaccine("03", "MMR"),
    "varicella": Vaccine("21", "varicella"),
    "hpv": Vaccine("62", "HPV, quadrivalent"),
    "covid": Vaccine(
        "208",
        "SARS-COV-2 (COVID-19) vaccine, mRNA, spike protein, LNP, preservative free, "
        "30 mcg/0.3mL dose",
    ),
}

RACES: tuple[tuple[str, str, float], ...] = (
    ("2106-3", "White", 0.70),
    ("2054-5", "Black or African American", 0.13),
    ("2028-9", "Asian", 0.07),
    ("1002-5", "American Indian or Alaska Native", 0.02),
    ("2076-8", "Native Hawaiian or Other Pacific Islander", 0.01),
    ("2131-1", "Other Race", 0.07),
)
ETHNICITIES: tuple[tuple[str, str], ...] = (
    ("2135-2", "Hispanic or Latino"),
    ("2186-5", "Not Hispanic or Latino"),
)
MARITAL_STATUSES: dict[str, str] = {
    "M": "Married",
    "S": "Never Married",
    "D": "Divorced",
    "W": "Widowed",
}
LANGUAGES: tuple[tuple[str, str, float], ...] = (
    ("en-US", "English (United States)", 0.86),
    ("es", "Spanish", 0.10),
    ("zh", "Chinese", 0.02),
    ("vi", "Vietnamese", 0.02),
)
PAYERS: tuple[str, ...] = (
    "Blue Cross Blue Shield",
    "Aetna",
    "UnitedHealthcare",
    "Cigna Health",
    "Humana",
    "Anthem",
)
STATES: tuple[str, ...] = (
    "MA",
    "NY",
    "CA",
    "TX",
    "FL",
    "IL",
    "PA",
    "OH",
    "GA",
    "NC",
    "MI",
    "NJ",
    "VA",
    "WA",
    "AZ",
)
DISCHARGE_DISPOSITIONS: tuple[tuple[str, str], ...] = (
    ("home", "Home"),
    ("snf", "Skilled nursing facility"),
    ("rehab", "Rehabilitation"),
    ("other-hcf", "Other healthcare facility"),
    ("aadvice", "Left against advice"),
)
